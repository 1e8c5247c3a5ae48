"""Token-bucket math (GCRA) and the store interface both bucket stores implement.

A bucket with a per-minute limit L holds at most L units and refills at L/60 units per second.
GCRA stores one number per bucket instead of (level, last refill): the theoretical arrival time
`tat`, the instant at which the bucket would be full again. `tat - now` is the bucket's debt in
seconds; each unit costs `interval = 60 / L` seconds of debt and a charge is admitted while the
debt stays within one window (60 s = L units). A bucket whose `tat` is in the past is full, so an
idle bucket needs no state at all (and its Redis key can simply expire).

Reserving tokens charges them before the call; settling refunds the unused part by lowering `tat`
(never below `now`: a bucket cannot hold more than it is full).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

WINDOW_S = 60.0
"""A full bucket is one minute of refill: capacity equals the per-minute limit."""
SLACK_S = 1e-6
"""Waits up to this are treated as zero: float rounding of summed intervals must not reject the
L-th unit of a burst (the slack is one microsecond of refill, far below one unit for any limit
under 60 million per minute)."""


def gcra_charge(tat: float | None, now: float, interval: float, amount: int) -> tuple[float, float]:
    """Charge `amount` units to a bucket whose state is `tat` (None: full). Returns (new_tat,
    wait): wait == 0 means the bucket has room and new_tat is its state after the charge; wait > 0
    is how long until it would have room (new_tat is then meaningless)."""
    base = now if tat is None or tat < now else tat
    new_tat = base + amount * interval
    wait = new_tat - now - WINDOW_S
    return new_tat, (wait if wait > SLACK_S else 0.0)


def gcra_refund(tat: float | None, now: float, interval: float, amount: int) -> float | None:
    """Give `amount` units back (negative: charge them without an admission check, e.g. a call
    that used more than it reserved). Returns the new state; None means the bucket is full."""
    if tat is None and amount >= 0:
        return None
    base = now if tat is None or tat < now else tat
    new_tat = base - amount * interval
    return new_tat if new_tat > now else None


class Bucket(NamedTuple):
    """One bucket: its store key and cost per unit. Built once per (tenant, key, tier) and
    reused; the units a call charges are passed beside it."""

    key: str
    """Store key; every key of one tenant shares a Redis Cluster hash tag ({tenant})."""
    interval_s: float
    """Seconds of refill per unit: 60 / per-minute limit."""


class StreamSlot(NamedTuple):
    """A concurrent-stream slot a streaming call holds from reserve to settle."""

    key: str
    """Store key of the tenant's open-stream set."""
    limit: int
    """Most streams the tenant may hold open."""
    member: str
    """This call's unique id in the set (Redis), so releasing twice cannot free two slots."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a charge was not admitted; nothing was charged."""

    waits: tuple[float, ...]
    """Seconds until each bucket (in the order given) has room; 0.0 for those with room now."""
    streams_full: bool
    """The tenant already holds its most concurrent streams."""


class LimitStore(Protocol):
    """Where bucket states live. `charge` is all-or-nothing over every bucket and the slot."""

    async def charge(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> Rejection | None:
        """Charge each bucket its amount and take the slot if all have room (None); else charge
        nothing."""
        ...

    async def refund(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> None:
        """Give each bucket its amount back and release the slot."""
        ...

    async def close(self) -> None: ...

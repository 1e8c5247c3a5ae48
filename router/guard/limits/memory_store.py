"""Bucket states in this process: exact for a single router, a few µs per call.

All methods run to completion without awaiting, so on one event loop no two calls interleave
and no lock is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from router.guard.limits.buckets import (
    Bucket,
    Rejection,
    StreamSlot,
    gcra_charge,
    gcra_refund,
)

_SWEEP_INTERVAL_S = 60.0
"""How often full buckets are dropped, so keys seen once (an API key used a single time) do not
accumulate; a full bucket and an absent one are the same."""


class MemoryStore:
    """GCRA states in a dict; open streams as a count per tenant."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._streams: dict[str, int] = {}
        self._next_sweep = clock() + _SWEEP_INTERVAL_S

    def __len__(self) -> int:
        """Buckets currently holding state (for tests and a gauge)."""
        return len(self._tat)

    def open_streams(self, key: str) -> int:
        return self._streams.get(key, 0)

    async def charge(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> Rejection | None:
        return self.charge_now(buckets, amounts, slot)

    async def refund(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> None:
        self.refund_now(buckets, amounts, slot)

    async def close(self) -> None:
        self._tat.clear()
        self._streams.clear()

    def charge_now(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> Rejection | None:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        tats = self._tat
        new_tats = []
        for (key, interval), amount in zip(buckets, amounts, strict=True):
            new_tat, wait = gcra_charge(tats.get(key), now, interval, amount)
            if wait:
                return self._rejection(buckets, amounts, slot, now)
            new_tats.append(new_tat)
        if slot is not None:
            open_now = self._streams.get(slot.key, 0)
            if open_now >= slot.limit:
                return self._rejection(buckets, amounts, slot, now)
            self._streams[slot.key] = open_now + 1
        for (key, _), new_tat in zip(buckets, new_tats, strict=True):
            tats[key] = new_tat
        return None

    def _rejection(
        self,
        buckets: Sequence[Bucket],
        amounts: Sequence[int],
        slot: StreamSlot | None,
        now: float,
    ) -> Rejection:
        """Every limit the call would exceed (the message names them all), charging nothing."""
        waits = tuple(
            gcra_charge(self._tat.get(key), now, interval, amount)[1]
            for (key, interval), amount in zip(buckets, amounts, strict=True)
        )
        full = slot is not None and self._streams.get(slot.key, 0) >= slot.limit
        return Rejection(waits, full)

    def refund_now(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> None:
        now = self._clock()
        tats = self._tat
        for (key, interval), amount in zip(buckets, amounts, strict=True):
            new_tat = gcra_refund(tats.get(key), now, interval, amount)
            if new_tat is None:
                tats.pop(key, None)
            else:
                tats[key] = new_tat
        if slot is not None:
            left = self._streams.get(slot.key, 0) - 1
            if left > 0:
                self._streams[slot.key] = left
            else:
                self._streams.pop(slot.key, None)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_INTERVAL_S
        full = [key for key, tat in self._tat.items() if tat <= now]
        for key in full:
            del self._tat[key]

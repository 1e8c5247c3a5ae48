"""Admission: whether a model takes one more call, by the wait it can expect, not only by how
many are queued.

A queue-length limit alone lets a call in and then keeps it waiting for as long as the queue
takes to drain: at 16 slots + 256 waiting, every call of a full queue waited ~25 s before its
first token. Here a call is shed at once (RESOURCE_EXHAUSTED, with a RetryInfo of when the queue
ahead of it will have drained) when the wait it can expect exceeds ADMIT_FRACTION of
`max_wait_s`, and a call admitted that still
has no slot after `max_wait_s` (the estimate was unknown or wrong) is shed then (`timed_out`;
the engines apply it), so no call waits longer than the bound for a slot:

    expected wait = (calls ahead of it in the queue + 1) / departures per second

The bound is on the first token, not only on the slot: once a call has its slot, its prefill
and first step still take time (seconds on a busy CPU). The engines report that time
(`first_token`), and a call may wait for a slot only the bound less its 90th percentile over
the last FIRST_TOKEN_SAMPLES calls (`slot_wait_s`, never under MIN_SLOT_FRACTION of the bound,
and that fraction until MIN_FIRST_TOKENS have been seen).

Departures (calls leaving their slot: finished, cancelled, failed) count only while every slot
is taken, and on a clock that runs only then: a departure while slots stand free says nothing of
capacity, and idle time between bursts must not dilute the rate. The rate is the last
RATE_DEPARTURES such departures over the full-load time they took (the time since the oldest
included, so a stalled engine's rate falls); until MIN_DEPARTURES have been seen only the length
limit applies (a model never yet under full load has no rate). Calls ahead are the waiting calls
of its priority or higher, as the scheduler serves higher priorities first: a HIGH call is shed
later than a LOW one.

Why by hand: the estimate needs the engine's own departures and slot count, which no admission
library sees; it is Little's law over a sliding window, a dozen lines.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from router.errors import ResourceExhausted
from router.scheduler.generation import EngineLimits
from router.scheduler.request import Priority

RATE_DEPARTURES = 64
"""Full-load departures the rate is measured over."""
MIN_DEPARTURES = 8
"""Full-load departures seen before the expected wait is trusted."""
ADMIT_FRACTION = 0.5
"""A call is admitted while its expected wait is at most this part of the bound: the rest
is margin for the estimate's error (it is a mean, the bound a maximum)."""
FIRST_TOKEN_SAMPLES = 64
"""Slot-to-first-token times the first-token estimate is taken over."""
FIRST_TOKEN_QUANTILE = 0.9
MIN_FIRST_TOKENS = 16
"""Slot-to-first-token times seen before their estimate is trusted; until then a call may wait
for a slot MIN_SLOT_FRACTION of the bound. (The first calls of a burst are the first prefilled,
so its early samples are its fastest: trusting them let a cold burst's last calls pass the bound
by a second and more.)"""
MIN_SLOT_FRACTION = 0.5
"""However slow first tokens are, a call may wait this part of the bound for a slot."""


class Admission:
    """One model's admission: `admit` before a call joins, `depart` when it leaves (loop side)."""

    def __init__(
        self, name: str, limits: EngineLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`limits.max_wait_s` 0 turns the wait bound off (the length limit still holds)."""
        self.name = name
        self._max_slots = limits.max_slots
        self._max_waiting = limits.max_waiting
        self._max_wait_s = limits.max_wait_s
        self._clock = clock
        self._departures: collections.deque[float] = collections.deque(maxlen=RATE_DEPARTURES)
        """Full-load clock readings at departures under full load."""
        self._live: collections.Counter[Priority] = collections.Counter()
        self._in_flight = 0
        self._full_total = 0.0  # full-load seconds before the current full-load spell
        self._full_since: float | None = None  # when the current spell began
        self._first_tokens: collections.deque[float] = collections.deque(maxlen=FIRST_TOKEN_SAMPLES)
        self._unsorted = 0
        """Samples since the estimate was last computed."""
        self._slot_wait_s = limits.max_wait_s * MIN_SLOT_FRACTION

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _full_clock(self, now: float) -> float:
        """Seconds spent with every slot taken, ever (runs only then)."""
        if self._full_since is None:
            return self._full_total
        return self._full_total + (now - self._full_since)

    def _set_in_flight(self, value: int, now: float) -> None:
        self._in_flight = value
        full = value >= self._max_slots
        if full and self._full_since is None:
            self._full_since = now
        elif not full and self._full_since is not None:
            self._full_total += now - self._full_since
            self._full_since = None

    def departures_per_s(self) -> float | None:
        """Slots freed per second under full load; None until enough have been seen."""
        departures = self._departures
        if len(departures) < MIN_DEPARTURES:
            return None
        # n departures span n - 1 intervals; measured up to now, so that a stall lowers it.
        span = self._full_clock(self._clock()) - departures[0]
        return (len(departures) - 1) / span if span > 0 else None

    def expected_wait_s(self, priority: Priority) -> float | None:
        """Seconds a call of `priority` joining now can expect to wait for a slot; None when
        unknown (no rate yet), 0 when a slot is free."""
        in_flight = self.in_flight
        if in_flight < self._max_slots:
            return 0.0
        rate = self.departures_per_s()
        if rate is None:
            return None
        waiting = in_flight - self._max_slots
        at_or_above = sum(n for p, n in self._live.items() if p >= priority)
        ahead = min(waiting, at_or_above)
        return (ahead + 1) / rate

    @property
    def slot_wait_s(self) -> float:
        """How long an admitted call may wait for a slot (0: no bound): max_wait_s less the
        time a call's first token takes once it has its slot, so that the bound holds for the
        first token."""
        return self._slot_wait_s

    def first_token(self, seconds: float) -> None:
        """A call's first token came `seconds` after it got its slot (its prefill and step)."""
        samples = self._first_tokens
        samples.append(seconds)
        self._unsorted += 1
        # Re-estimated every few samples once the window is full: a sort per call showed up
        # in profiles of a busy gateway.
        if len(samples) < MIN_FIRST_TOKENS:
            return
        if self._max_wait_s > 0 and (self._unsorted >= 8 or len(samples) < FIRST_TOKEN_SAMPLES):
            self._unsorted = 0
            ordered = sorted(samples)
            estimate = ordered[int(FIRST_TOKEN_QUANTILE * (len(ordered) - 1))]
            self._slot_wait_s = max(
                self._max_wait_s - estimate, self._max_wait_s * MIN_SLOT_FRACTION
            )

    def admit(self, priority: Priority) -> None:
        """Count the call in, or raise ResourceExhausted saying why and when to come back."""
        self.check(priority)
        self._live[priority] += 1
        self._set_in_flight(self._in_flight + 1, self._clock())

    def check(self, priority: Priority) -> None:
        """Raise what `admit` would raise now, counting nothing: the answering pipeline asks
        before it tokenizes, so that a call to be shed costs no more than its round trip."""
        in_flight = self.in_flight
        limit = self._max_slots + self._max_waiting
        if in_flight >= limit:
            wait = self.expected_wait_s(priority)
            raise ResourceExhausted(
                f"model {self.name!r} has {in_flight} requests in flight, its limit "
                f"(max_slots {self._max_slots} + max_waiting {self._max_waiting}); "
                "retry shortly",
                retry_after_s=self._drain_s(wait),
            )
        if self._max_wait_s > 0:
            wait = self.expected_wait_s(priority)
            if wait is not None and wait > self._slot_wait_s * ADMIT_FRACTION:
                raise ResourceExhausted(
                    f"model {self.name!r} is busy: a {priority.name} call would wait about "
                    f"{wait:.1f} s for a slot, too close to its bound of {self._max_wait_s:g} s "
                    "for a first token (max_queue_wait_s); retry after the RetryInfo delay",
                    retry_after_s=self._drain_s(wait),
                )

    def timed_out(self, priority: Priority) -> ResourceExhausted:
        """The error of a call admitted that found no slot within slot_wait_s (the estimate was
        unknown, as before any rate was measured, or too low): it leaves rather than wait on."""
        wait = self.expected_wait_s(priority)
        return ResourceExhausted(
            f"model {self.name!r} found no slot for this call in time for a first token within "
            f"max_queue_wait_s={self._max_wait_s:g} s; retry after the RetryInfo delay",
            retry_after_s=self._drain_s(wait),
        )

    def _drain_s(self, wait: float | None) -> float:
        """RetryInfo of a shed call: the time the queue ahead of it takes to drain (its expected
        wait; at least 1 s), so that clients who honour it come back when there is room."""
        return 1.0 if wait is None else max(wait, 1.0)

    def depart(self, priority: Priority, *, held_slot: bool = True) -> None:
        """The call left (finished, cancelled, failed). `held_slot` False for a call that never
        got a slot: it frees nothing a waiting call could take, so it is not a departure."""
        now = self._clock()
        if held_slot and self._in_flight >= self._max_slots:
            self._departures.append(self._full_clock(now))
        self._live[priority] -= 1
        if self._live[priority] <= 0:
            del self._live[priority]
        self._set_in_flight(self._in_flight - 1, now)

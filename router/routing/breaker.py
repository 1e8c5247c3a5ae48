"""Per-replica circuit breaker: stop sending calls to a replica that keeps failing, probe it after
a cool-down, and take it back when a probe succeeds.

    CLOSED ──(consecutive_failures in a row, or error_rate over window_s)──▶ OPEN
    OPEN ──(cooldown elapsed; seen lazily by the next allow())──▶ HALF_OPEN
    HALF_OPEN ──(first probe succeeds)──▶ CLOSED    (cool-down back to cooldown_s)
    HALF_OPEN ──(a probe fails)──▶ OPEN              (cool-down doubled, ≤ max_cooldown_s)

The error rate only counts once the window holds min_requests calls.

The breaker never runs anything by itself: time is read from an injected monotonic clock whenever
it is asked, so tests drive it with a fake clock. A call's life is `ticket = on_start()`, then one
of `on_success(ticket)`, `on_failure(ticket)` or `on_abandon(ticket)` (cancelled, no verdict).
The ticket says whether the call is a probe of the current half-open episode: only probes decide
a half-open breaker, and a late answer from a call sent before the breaker opened does not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from router.routing.config import BreakerConfig
from router.routing.window import WindowCounts

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

_REQUESTS, _FAILURES = 0, 1


class BreakerState(IntEnum):
    """Ordered by how much traffic passes: CLOSED (all) < HALF_OPEN (probes) < OPEN (none)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What health checks, metrics and ListModels show about one breaker."""

    state: BreakerState
    consecutive_failures: int
    window_requests: int
    window_failures: int
    retry_in_s: float
    """Seconds until an open breaker lets a probe through (0 unless OPEN)."""
    times_opened: int


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_config",
        "_consecutive",
        "_cooldown",
        "_episode",
        "_open_until",
        "_probes",
        "_state",
        "_window",
        "name",
        "on_change",
        "times_opened",
    )

    def __init__(
        self,
        config: BreakerConfig,
        *,
        name: str = "",
        clock: Clock = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self.name = name
        """Replica the breaker guards (for logs and metrics)."""
        self.on_change = on_change
        """Called with (name, old, new) on every state change, e.g. to update a metric."""
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window = WindowCounts(config.window_s)
        self._cooldown = config.cooldown_s
        self._open_until = 0.0
        self._probes = 0
        self._episode = 0  # half-open episodes so far; a probe's ticket is its episode
        self.times_opened = 0

    @property
    def config(self) -> BreakerConfig:
        return self._config

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """Whether a call may be sent now (closed, or half-open with a probe slot free)."""
        state = self._state
        if state is BreakerState.CLOSED:
            return True
        state = self.state
        if state is BreakerState.HALF_OPEN:
            return self._probes < self._config.half_open_probes
        return False

    def on_start(self) -> int:
        """A call is being sent; returns its ticket (non-zero for a half-open probe)."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes += 1
            return self._episode
        return 0

    def on_success(self, ticket: int) -> None:
        if self._state is BreakerState.CLOSED:
            self._consecutive = 0
            self._window.add(self._clock(), _REQUESTS)
        elif self._is_probe(ticket):
            self._close()

    def on_failure(self, ticket: int) -> None:
        if self._state is BreakerState.CLOSED:
            now = self._clock()
            self._consecutive += 1
            self._window.add(now, _REQUESTS)
            self._window.add(now, _FAILURES)
            if self._should_open(now):
                self._open(now)
        elif self._is_probe(ticket):
            self._cooldown = min(self._cooldown * 2, self._config.max_cooldown_s)
            self._open(self._clock())

    def on_abandon(self, ticket: int) -> None:
        """The call ended without a verdict (the client cancelled): free its probe slot."""
        if self._is_probe(ticket):
            self._probes -= 1

    def snapshot(self) -> BreakerSnapshot:
        state = self.state
        now = self._clock()
        requests, failures = self._window.totals(now)
        retry_in = max(0.0, self._open_until - now) if state is BreakerState.OPEN else 0.0
        return BreakerSnapshot(
            state, self._consecutive, requests, failures, retry_in, self.times_opened
        )

    # ---- transitions -----------------------------------------------------------------------

    def _is_probe(self, ticket: int) -> bool:
        return ticket != 0 and ticket == self._episode and self._state is BreakerState.HALF_OPEN

    def _should_open(self, now: float) -> bool:
        cfg = self._config
        if self._consecutive >= cfg.consecutive_failures:
            return True
        requests, failures = self._window.totals(now)
        return requests >= cfg.min_requests and failures >= cfg.error_rate * requests

    def _open(self, now: float) -> None:
        self._open_until = now + self._cooldown
        self._probes = 0
        self.times_opened += 1
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        self._consecutive = 0
        self._probes = 0
        self._cooldown = self._config.cooldown_s
        self._window.clear()  # the failures that opened it must not re-open it at once
        self._move(BreakerState.CLOSED)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if new is BreakerState.HALF_OPEN:
            self._episode += 1
        if new is BreakerState.OPEN:
            logger.warning(
                "circuit breaker %s open for %.1fs (%d failures in a row)",
                self.name,
                self._cooldown,
                self._consecutive,
            )
        else:
            logger.info("circuit breaker %s %s", self.name, new.name.lower().replace("_", "-"))
        if self.on_change is not None:
            self.on_change(self.name, old, new)

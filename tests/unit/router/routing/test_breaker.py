"""Circuit breaker transitions, driven by a hand-moved clock (no sleeps)."""

from __future__ import annotations

from typing import Any

from router.routing.breaker import BreakerState, CircuitBreaker
from router.routing.config import BreakerConfig


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_breaker(clock: FakeClock, **settings: Any) -> CircuitBreaker:
    defaults: dict[str, Any] = {
        "consecutive_failures": 3,
        "error_rate": 1.0,
        "min_requests": 1000,
        "cooldown_s": 5.0,
        "max_cooldown_s": 30.0,
    }
    defaults.update(settings)
    return CircuitBreaker(BreakerConfig(**defaults), name="d/r", clock=clock)


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # a call, so that mypy does not narrow the property between checks


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.on_failure(breaker.on_start())


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.on_success(breaker.on_start())


def test_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker, 2)
    assert state(breaker) is BreakerState.CLOSED and breaker.allow()
    fail(breaker)
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.snapshot().retry_in_s == 5.0


def test_error_rate_opens_only_once_the_window_holds_min_requests() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=100, error_rate=0.5, min_requests=10)
    for _ in range(4):
        succeed(breaker)
        fail(breaker)
    succeed(breaker)
    assert state(breaker) is BreakerState.CLOSED  # 4 of 9: below min_requests and below half
    fail(breaker)  # 5 of 10
    assert state(breaker) is BreakerState.OPEN


def test_error_rate_forgets_calls_older_than_the_window() -> None:
    clock = FakeClock()
    breaker = make_breaker(
        clock, consecutive_failures=100, error_rate=0.5, min_requests=4, window_s=10.0
    )
    fail(breaker, 3)
    clock.advance(11.0)  # those three failures leave the window
    succeed(breaker, 2)
    fail(breaker)
    assert breaker.snapshot().window_failures == 1
    assert state(breaker) is BreakerState.CLOSED
    fail(breaker)  # 2 of 4 within the window
    assert state(breaker) is BreakerState.OPEN


def test_half_open_after_cooldown_lets_only_the_probes_through() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, half_open_probes=2)
    fail(breaker, 3)
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN
    first, second = breaker.on_start(), breaker.on_start()
    assert first and second
    assert not breaker.allow()  # both probe slots taken
    breaker.on_abandon(second)  # a cancelled probe frees its slot without a verdict
    assert breaker.allow()
    breaker.on_success(first)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.snapshot().consecutive_failures == 0


def test_failed_probe_reopens_with_doubled_cooldown_up_to_the_cap() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, cooldown_s=5.0, max_cooldown_s=12.0)
    fail(breaker, 3)
    cooldowns = []
    for _ in range(3):
        cooldowns.append(breaker.snapshot().retry_in_s)
        clock.advance(cooldowns[-1])
        assert breaker.allow()
        fail(breaker)  # the probe fails
        assert state(breaker) is BreakerState.OPEN
    assert cooldowns == [5.0, 10.0, 12.0]
    clock.advance(12.0)
    succeed(breaker)
    assert state(breaker) is BreakerState.CLOSED
    fail(breaker, 3)
    assert breaker.snapshot().retry_in_s == 5.0  # a close resets the back-off


def test_only_probes_decide_a_half_open_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    early = breaker.on_start()  # sent while closed, answers late
    fail(breaker, 3)
    clock.advance(5.0)
    assert state(breaker) is BreakerState.HALF_OPEN
    breaker.on_success(early)
    assert state(breaker) is BreakerState.HALF_OPEN
    breaker.on_failure(early)
    assert state(breaker) is BreakerState.HALF_OPEN
    probe = breaker.on_start()
    breaker.on_failure(probe)
    assert state(breaker) is BreakerState.OPEN
    clock.advance(10.0)
    stale_probe = probe  # a probe of the previous half-open episode
    assert state(breaker) is BreakerState.HALF_OPEN
    breaker.on_success(stale_probe)
    assert state(breaker) is BreakerState.HALF_OPEN


def test_closing_clears_the_window_so_old_failures_do_not_reopen_it() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=100, error_rate=0.5, min_requests=4)
    fail(breaker, 4)
    assert state(breaker) is BreakerState.OPEN
    clock.advance(5.0)
    succeed(breaker)  # the probe
    fail(breaker)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.snapshot().window_failures == 1


def test_transitions_are_observable() -> None:
    clock = FakeClock()
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        BreakerConfig(consecutive_failures=1, cooldown_s=1.0),
        name="llama/gpu0",
        clock=clock,
        on_change=lambda name, old, new: seen.append((name, old, new)),
    )
    fail(breaker)
    clock.advance(1.0)
    succeed(breaker)
    assert seen == [
        ("llama/gpu0", BreakerState.CLOSED, BreakerState.OPEN),
        ("llama/gpu0", BreakerState.OPEN, BreakerState.HALF_OPEN),
        ("llama/gpu0", BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    snap = breaker.snapshot()
    assert (snap.state, snap.times_opened) == (BreakerState.CLOSED, 1)

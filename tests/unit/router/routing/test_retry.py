"""Retry rules: the budget, per-attempt deadlines, the first-token rule, hedging, fallbacks."""

from __future__ import annotations

import pytest

from router.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from router.routing.config import HedgingConfig, RetryConfig
from router.routing.retry import (
    RetryBudget,
    Verdict,
    attempt_timeout,
    classify,
    fallback_chain,
    hedge_delay,
    may_retry,
)


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spend_all(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_spend():
        spent += 1
        assert spent < 10_000
    return spent


def test_budget_allows_the_ratio_of_recent_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryConfig(budget_ratio=0.2, min_retries_per_s=0.0), clock=clock)
    for _ in range(100):
        budget.on_request()
    assert spend_all(budget) == 20
    assert not budget.try_spend()
    for _ in range(10):
        budget.on_request()
    assert spend_all(budget) == 2  # 20% of the 10 new requests


def test_budget_floor_lets_a_quiet_deployment_retry() -> None:
    clock = FakeClock()
    config = RetryConfig(budget_ratio=0.2, min_retries_per_s=1.0, budget_window_s=10.0)
    budget = RetryBudget(config, clock=clock)
    assert budget.available() == 10.0
    assert spend_all(budget) == 10


def test_budget_refills_as_the_window_slides() -> None:
    clock = FakeClock()
    config = RetryConfig(budget_ratio=0.5, min_retries_per_s=0.0, budget_window_s=10.0)
    budget = RetryBudget(config, clock=clock)
    for _ in range(10):
        budget.on_request()
    assert spend_all(budget) == 5
    clock.now += 11.0  # requests and retries both left the window
    assert budget.available() == 0.0
    for _ in range(4):
        budget.on_request()
    assert spend_all(budget) == 2


@pytest.mark.parametrize("tokens", [1, 2, 500])
def test_never_retry_once_a_token_reached_the_client(tokens: int) -> None:
    assert may_retry(0)
    assert not may_retry(tokens)


@pytest.mark.parametrize(
    ("deadline", "per_attempt", "expected"),
    [
        (None, 0.0, None),  # no limit at all
        (None, 2.0, 2.0),  # per-attempt only
        (110.0, 0.0, 10.0),  # the caller's deadline only
        (110.0, 2.0, 2.0),  # per-attempt inside the deadline
        (101.0, 2.0, 1.0),  # the deadline cuts the last attempt short
        (99.0, 2.0, -1.0),  # past: nothing left
    ],
)
def test_attempt_timeout_stays_within_the_callers_deadline(
    deadline: float | None, per_attempt: float, expected: float | None
) -> None:
    assert attempt_timeout(100.0, deadline, per_attempt) == expected


def test_hedging_is_for_unary_calls_only_and_bounded() -> None:
    hedging = HedgingConfig(delay_s=0.05, max_hedges=2)
    assert hedge_delay(hedging, unary=True, hedges_sent=0) == 0.05
    assert hedge_delay(hedging, unary=True, hedges_sent=1) == 0.05
    assert hedge_delay(hedging, unary=True, hedges_sent=2) is None
    assert hedge_delay(hedging, unary=False, hedges_sent=0) is None
    assert hedge_delay(HedgingConfig(), unary=True, hedges_sent=0) is None


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (Unavailable("down"), Verdict.REPLICA_FAILED),
        (DeadlineExceeded("slow"), Verdict.REPLICA_FAILED),
        (ConnectionResetError("reset"), Verdict.REPLICA_FAILED),
        (TimeoutError(), Verdict.REPLICA_FAILED),
        (ResourceExhausted("busy"), Verdict.OVERLOADED),
        (InvalidArgument("bad", field="prompt"), Verdict.CALLER_ERROR),
        (NotFound("no"), Verdict.CALLER_ERROR),
    ],
)
def test_classify(error: Exception, verdict: Verdict) -> None:
    assert classify(error) is verdict


def test_fallback_chain_is_depth_first_and_visits_each_deployment_once() -> None:
    graph = {"a": ("b", "c"), "b": ("d", "c"), "c": ("d",), "d": ()}
    assert fallback_chain(graph, "a") == ("a", "b", "d", "c")
    assert fallback_chain(graph, "c") == ("c", "d")
    assert fallback_chain(graph, "d") == ("d",)

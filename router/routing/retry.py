"""When a failed call may be tried again, where, and for how long: the rules the dispatcher
follows, as pure functions and one small stateful budget.

- A call is retried only before its first token reached the client (`may_retry`): a stream
  cannot be taken back, and a repeated token is worse than an error.
- Retries and hedges spend a budget (Finagle's RetryBudget, Envoy's retry_budget): at most
  `budget_ratio` of the recent requests, plus `min_retries_per_s`. When a deployment fails
  everywhere, retries stay a fraction of its traffic instead of multiplying it.
- Every attempt has a deadline inside the caller's: `attempt_timeout`.
- A deployment that cannot answer hands the call to its fallbacks, depth first, in order
  (`fallback_chain`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence

import grpc

from router.errors import RouterError
from router.routing.config import HedgingConfig, RetryConfig
from router.routing.window import WindowCounts

_REQUESTS, _RETRIES = 0, 1


class RetryBudget:
    """Retries allowed over the last budget_window_s: budget_ratio * requests +
    min_retries_per_s * budget_window_s. `on_request()` for every call, `try_spend()` before
    every retry or hedge."""

    __slots__ = ("_clock", "_config", "_floor", "_window")

    def __init__(self, config: RetryConfig, *, clock: Callable[[], float] = time.monotonic):
        self._config = config
        self._clock = clock
        self._window = WindowCounts(config.budget_window_s)
        self._floor = config.min_retries_per_s * config.budget_window_s

    def on_request(self) -> None:
        self._window.add(self._clock(), _REQUESTS)

    def available(self) -> float:
        """Retries that may still be spent now."""
        requests, retries = self._window.totals(self._clock())
        return self._config.budget_ratio * requests + self._floor - retries

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        now = self._clock()
        requests, retries = self._window.totals(now)
        if retries + 1 > self._config.budget_ratio * requests + self._floor:
            return False
        self._window.add(now, _RETRIES)
        return True


def may_retry(streamed_tokens: int) -> bool:
    """A call may be retried or handed to a fallback only while nothing has reached the client."""
    return streamed_tokens == 0


def attempt_timeout(now: float, deadline: float | None, attempt_timeout_s: float) -> float | None:
    """Seconds the next attempt may run: the per-attempt timeout (0: none) cut to the time left
    before the caller's deadline (None: none). None means unbounded; ≤ 0 means no time is left."""
    left = None if deadline is None else deadline - now
    if attempt_timeout_s > 0:
        return attempt_timeout_s if left is None else min(attempt_timeout_s, left)
    return left


def hedge_delay(hedging: HedgingConfig, *, unary: bool, hedges_sent: int) -> float | None:
    """How long to wait for an answer before sending the next hedge; None: send no hedge.
    Streams are never hedged (two streams could each deliver tokens)."""
    if not unary or not hedging.enabled or hedges_sent >= hedging.max_hedges:
        return None
    return hedging.delay_s


class Verdict(enum.Enum):
    """What a failed attempt says about its replica and about retrying."""

    REPLICA_FAILED = "replica_failed"
    """The replica is at fault (unreachable, crashed, timed out): its breaker counts it, and the
    call is retried elsewhere."""
    OVERLOADED = "overloaded"
    """The replica shed the call (RESOURCE_EXHAUSTED): retried elsewhere, the breaker is left
    alone (least-outstanding balancing already steers away from busy replicas)."""
    CALLER_ERROR = "caller_error"
    """The request itself is wrong or was refused (INVALID_ARGUMENT, NOT_FOUND, ...): another
    replica would answer the same, so it goes straight back to the client."""


_CALLER_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def classify(error: BaseException) -> Verdict:
    """A RouterError by its status code; any other exception (a connection error, a timeout, a
    crash in the backend) is the replica's failure."""
    if isinstance(error, RouterError):
        if error.code in _CALLER_CODES:
            return Verdict.CALLER_ERROR
        if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Verdict.OVERLOADED
    return Verdict.REPLICA_FAILED


def fallback_chain(fallbacks: Mapping[str, Sequence[str]], start: str) -> tuple[str, ...]:
    """`start`, then each of its fallbacks followed by that one's own chain, depth first, each
    deployment once: with a → [b, c] and b → [d], the chain of a is (a, b, d, c)."""
    chain: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        chain.append(name)
        for nxt in fallbacks.get(name, ()):
            visit(nxt)

    visit(start)
    return tuple(chain)

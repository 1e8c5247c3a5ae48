"""The dispatcher over real asyncio tasks: attempts are plain coroutines and async generators that
answer, fail or hang on purpose, so retries, deadlines and hedges run as they will in the server."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from router.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from router.routing.breaker import BreakerState
from router.routing.config import (
    BalancerKind,
    BreakerConfig,
    DeploymentConfig,
    HedgingConfig,
    ReplicaConfig,
    RetryConfig,
    RoutingConfig,
)
from router.routing.dispatch import AttemptInfo, Dispatcher, NoReplicaAvailable

HANG_S = 30.0  # longer than any test: an attempt that sleeps this long must be cut short


def deployment(
    name: str,
    replicas: int | list[str] = 3,
    *,
    balancer: BalancerKind = "round_robin",
    fallbacks: tuple[str, ...] = (),
    **retry: Any,
) -> DeploymentConfig:
    replica_names = (
        [f"{name}-{i}" for i in range(replicas)] if isinstance(replicas, int) else replicas
    )
    hedging = HedgingConfig(delay_s=retry.pop("hedge_delay_s", 0.0))
    breaker = BreakerConfig(**retry.pop("breaker", {"consecutive_failures": 2, "cooldown_s": 60.0}))
    retry.setdefault("min_retries_per_s", 100.0)
    return DeploymentConfig(
        name,
        tuple(ReplicaConfig(r) for r in replica_names),
        balancer=balancer,
        breaker=breaker,
        retry=RetryConfig(**retry),
        hedging=hedging,
        fallbacks=fallbacks,
    )


def make_dispatcher(*deployments: DeploymentConfig, **config: Any) -> Dispatcher:
    routing = RoutingConfig(deployments=deployments, **config).validate()
    return Dispatcher(routing, rng=random.Random(0))


class Backend:
    """Replica behaviours by name: 'ok' answers, 'fail' raises Unavailable, 'hang' never answers,
    'slow' answers after `slow_s`, 'reset' raises ConnectionResetError, 'bad' raises
    InvalidArgument, 'dies' (streams) fails after its first item. Records every attempt."""

    def __init__(self, behaviour: dict[str, str], *, slow_s: float = 0.2) -> None:
        self.behaviour = behaviour
        self.slow_s = slow_s
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.closed: list[str] = []

    async def _act(self, info: AttemptInfo) -> None:
        name = info.replica.name
        self.calls.append(name)
        what = self.behaviour.get(name, "ok")
        try:
            if what == "hang":
                await asyncio.sleep(HANG_S)
            elif what == "slow":
                await asyncio.sleep(self.slow_s)
            elif what == "fail":
                raise Unavailable(f"{name} is down")
            elif what == "reset":
                raise ConnectionResetError(f"{name} reset the connection")
            elif what == "bad":
                raise InvalidArgument("prompt is empty", field="prompt")
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise

    async def unary(self, info: AttemptInfo) -> str:
        await self._act(info)
        return f"answer from {info.replica.name}"

    async def stream(self, info: AttemptInfo) -> AsyncIterator[str]:
        name = info.replica.name
        try:
            await self._act(info)
            for i in range(3):
                if self.behaviour.get(name) == "dies" and i == 1:
                    raise ConnectionResetError(f"{name} died")
                yield f"{name}:{i}"
                await asyncio.sleep(0)
        finally:
            self.closed.append(name)


async def collect(items: AsyncIterator[str]) -> list[str]:
    return [item async for item in items]


async def settle(done: Callable[[], bool], what: str) -> None:
    """Let the loop run other tasks until `done()` (no wall-clock wait: a bounded number of
    turns of the loop)."""
    for _ in range(10_000):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def outstanding(dispatcher: Dispatcher) -> dict[str, int]:
    return {r.name: r.outstanding for d in dispatcher.health().values() for r in d.replicas}


def state(dispatcher: Dispatcher, deployment: str, replica: str) -> BreakerState:
    (health,) = [r for r in dispatcher.health()[deployment].replicas if r.name == replica]
    return health.breaker.state


# ---- unary -----------------------------------------------------------------------------------


async def test_a_failed_attempt_is_retried_on_another_replica() -> None:
    dispatcher = make_dispatcher(deployment("llama"))
    backend = Backend({"llama-0": "fail"})
    assert await dispatcher.unary("llama", backend.unary) == "answer from llama-1"
    assert backend.calls == ["llama-0", "llama-1"]
    health = {r.name: r.breaker for r in dispatcher.health()["llama"].replicas}
    assert (health["llama-0"].consecutive_failures, health["llama-0"].window_failures) == (1, 1)
    assert outstanding(dispatcher) == {"llama-0": 0, "llama-1": 0, "llama-2": 0}


async def test_the_request_own_error_is_not_retried_nor_held_against_the_replica() -> None:
    dispatcher = make_dispatcher(deployment("llama"))
    backend = Backend({"llama-0": "bad"})
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        await dispatcher.unary("llama", backend.unary)
    assert backend.calls == ["llama-0"]
    assert dispatcher.health()["llama"].replicas[0].breaker.window_requests == 0


async def test_a_hanging_replica_is_cut_off_by_the_attempt_timeout_and_another_answers() -> None:
    dispatcher = make_dispatcher(deployment("llama", attempt_timeout_s=0.05))
    backend = Backend({"llama-0": "hang"})
    started = time.monotonic()
    assert await dispatcher.unary("llama", backend.unary) == "answer from llama-1"
    assert time.monotonic() - started < HANG_S / 2
    assert backend.cancelled == ["llama-0"]
    assert dispatcher.health()["llama"].replicas[0].breaker.window_failures == 1
    assert outstanding(dispatcher)["llama-0"] == 0


async def test_the_attempt_is_told_its_timeout() -> None:
    dispatcher = make_dispatcher(deployment("llama", attempt_timeout_s=0.5))
    seen: list[AttemptInfo] = []

    async def attempt(info: AttemptInfo) -> str:
        seen.append(info)
        return "ok"

    await dispatcher.unary("llama", attempt, timeout_s=0.2)
    (info,) = seen
    assert (info.deployment, info.model, info.replica.name, info.attempt) == (
        "llama",
        "llama",
        "llama-0",
        1,
    )
    assert info.timeout_s is not None and 0.1 < info.timeout_s <= 0.2  # the caller's is shorter


async def test_the_callers_deadline_bounds_every_attempt() -> None:
    dispatcher = make_dispatcher(deployment("llama"))
    backend = Backend({f"llama-{i}": "hang" for i in range(3)})
    with pytest.raises(DeadlineExceeded, match=r"deadline of 0\.1s passed after 1 attempt"):
        await dispatcher.unary("llama", backend.unary, timeout_s=0.1)
    assert backend.cancelled == ["llama-0"]
    # The caller ran out of time: the replica is not blamed for it.
    assert dispatcher.health()["llama"].replicas[0].breaker.window_failures == 0


async def test_every_replica_failing_names_the_deployment_and_each_failure() -> None:
    dispatcher = make_dispatcher(deployment("llama", max_attempts=5))
    backend = Backend({"llama-0": "fail", "llama-1": "reset", "llama-2": "fail"})
    with pytest.raises(Unavailable) as caught:
        await dispatcher.unary("llama", backend.unary)
    message = str(caught.value)
    assert "deployment 'llama' could not answer after 3 attempt(s)" in message
    assert "llama-1: ConnectionResetError: llama-1 reset the connection" in message
    assert not isinstance(caught.value, NoReplicaAvailable)
    assert sorted(backend.calls) == ["llama-0", "llama-1", "llama-2"]  # each replica once


async def test_max_attempts_bounds_the_retries() -> None:
    dispatcher = make_dispatcher(deployment("llama", max_attempts=2))
    backend = Backend({"llama-0": "fail", "llama-1": "fail"})
    with pytest.raises(Unavailable, match="after 2 attempt"):
        await dispatcher.unary("llama", backend.unary)
    assert backend.calls == ["llama-0", "llama-1"]


async def test_fallback_chain_answers_when_the_deployment_cannot() -> None:
    dispatcher = make_dispatcher(
        deployment("primary", 2, fallbacks=("secondary",)),
        deployment("secondary", 1, fallbacks=("tertiary",)),
        deployment("tertiary", 1),
    )
    backend = Backend({"primary-0": "fail", "primary-1": "fail", "secondary-0": "reset"})
    assert await dispatcher.unary("primary", backend.unary) == "answer from tertiary-0"
    assert backend.calls == ["primary-0", "primary-1", "secondary-0", "tertiary-0"]


async def test_all_replicas_down_fails_fast_without_calling_anything() -> None:
    dispatcher = make_dispatcher(
        deployment("llama", 2, fallbacks=("backup",)), deployment("backup", 1)
    )
    backend = Backend({"llama-0": "fail", "llama-1": "fail", "backup-0": "fail"})
    for _ in range(2):  # consecutive_failures=2 trips every breaker
        with pytest.raises(Unavailable):
            await dispatcher.unary("llama", backend.unary)
    assert not dispatcher.health()["llama"].serving
    assert not dispatcher.health()["backup"].serving
    backend.calls.clear()
    started = time.monotonic()
    with pytest.raises(NoReplicaAvailable) as caught:
        await dispatcher.unary("llama", backend.unary, timeout_s=10.0)
    assert time.monotonic() - started < 1.0  # nothing waited for a replica
    assert backend.calls == []
    error = caught.value
    assert error.deployments == ("llama", "backup")
    assert 0 < error.retry_after_s <= 60.0
    assert "no replica of deployment 'llama' nor of its fallbacks ['backup']" in str(error)
    assert "llama/llama-0 open for" in str(error)
    with pytest.raises(NoReplicaAvailable):  # streams too, before any item
        await collect(dispatcher.stream("llama", backend.stream))
    assert backend.calls == []


async def test_an_open_breaker_takes_its_replica_out_of_rotation() -> None:
    dispatcher = make_dispatcher(deployment("llama", 3, max_attempts=3))
    backend = Backend({"llama-0": "fail"})
    answers = [await dispatcher.unary("llama", backend.unary) for _ in range(6)]
    assert state(dispatcher, "llama", "llama-0") is BreakerState.OPEN
    assert backend.calls.count("llama-0") == 2  # then never again
    assert set(answers) == {"answer from llama-1", "answer from llama-2"}


async def test_a_spent_retry_budget_stops_retries() -> None:
    dispatcher = make_dispatcher(deployment("llama", budget_ratio=0.0, min_retries_per_s=0.0))
    backend = Backend({"llama-0": "fail"})
    with pytest.raises(Unavailable, match="retry budget of deployment 'llama' is spent"):
        await dispatcher.unary("llama", backend.unary)
    assert backend.calls == ["llama-0"]


async def test_outstanding_counts_calls_in_flight() -> None:
    dispatcher = make_dispatcher(deployment("llama", 2, balancer="p2c"))
    gate = asyncio.Event()
    seen: list[dict[str, int]] = []

    entered: list[str] = []

    async def attempt(info: AttemptInfo) -> str:
        entered.append(info.replica.name)
        await gate.wait()
        return info.replica.name

    calls = [asyncio.ensure_future(dispatcher.unary("llama", attempt)) for _ in range(4)]
    await settle(lambda: len(entered) == 4, "four attempts started")
    seen.append(outstanding(dispatcher))
    gate.set()
    answers = await asyncio.gather(*calls)
    # Least outstanding: four calls over two idle replicas end up two each.
    assert seen == [{"llama-0": 2, "llama-1": 2}]
    assert sorted(answers) == ["llama-0", "llama-0", "llama-1", "llama-1"]
    assert outstanding(dispatcher) == {"llama-0": 0, "llama-1": 0}


async def test_a_cancelled_call_cancels_its_attempt_and_frees_the_replica() -> None:
    dispatcher = make_dispatcher(deployment("llama", 1))
    backend = Backend({"llama-0": "hang"})
    call = asyncio.ensure_future(dispatcher.unary("llama", backend.unary))
    await settle(lambda: backend.calls == ["llama-0"], "the attempt started")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert backend.cancelled == ["llama-0"]
    assert outstanding(dispatcher) == {"llama-0": 0}
    assert state(dispatcher, "llama", "llama-0") is BreakerState.CLOSED


# ---- hedging ---------------------------------------------------------------------------------


async def test_a_slow_unary_call_is_hedged_and_the_first_answer_wins() -> None:
    dispatcher = make_dispatcher(deployment("llama", 2, hedge_delay_s=0.02))
    backend = Backend({"llama-0": "slow"}, slow_s=HANG_S)
    started = time.monotonic()
    assert await dispatcher.unary("llama", backend.unary) == "answer from llama-1"
    assert time.monotonic() - started < HANG_S / 2
    assert backend.calls == ["llama-0", "llama-1"]
    assert backend.cancelled == ["llama-0"]
    # The loser was cancelled, not failed: its breaker is untouched.
    assert dispatcher.health()["llama"].replicas[0].breaker.window_requests == 0
    assert outstanding(dispatcher) == {"llama-0": 0, "llama-1": 0}


async def test_a_fast_answer_sends_no_hedge() -> None:
    dispatcher = make_dispatcher(deployment("llama", 2, hedge_delay_s=0.2))
    backend = Backend({})
    assert await dispatcher.unary("llama", backend.unary) == "answer from llama-0"
    assert backend.calls == ["llama-0"]


# ---- streams ---------------------------------------------------------------------------------


async def test_a_stream_is_retried_before_its_first_item() -> None:
    dispatcher = make_dispatcher(deployment("llama"))
    backend = Backend({"llama-0": "reset"})
    assert await collect(dispatcher.stream("llama", backend.stream)) == [
        "llama-1:0",
        "llama-1:1",
        "llama-1:2",
    ]
    assert backend.calls == ["llama-0", "llama-1"]
    assert outstanding(dispatcher) == {"llama-0": 0, "llama-1": 0, "llama-2": 0}


async def test_a_stream_is_never_retried_after_an_item_reached_the_client() -> None:
    dispatcher = make_dispatcher(
        deployment("llama", fallbacks=("backup",)), deployment("backup", 1)
    )
    backend = Backend({"llama-0": "dies"})
    received: list[str] = []
    with pytest.raises(Unavailable, match=r"replica 'llama-0' failed after 1 streamed item"):
        async for item in dispatcher.stream("llama", backend.stream):
            received.append(item)
    assert received == ["llama-0:0"]
    assert backend.calls == ["llama-0"]  # neither another replica nor the fallback
    breaker = dispatcher.health()["llama"].replicas[0].breaker
    assert breaker.window_failures == 1  # dying mid-stream counts against the replica


async def test_a_stream_that_sends_nothing_in_time_is_retried_elsewhere() -> None:
    dispatcher = make_dispatcher(deployment("llama", attempt_timeout_s=0.05))
    backend = Backend({"llama-0": "hang"})
    assert (await collect(dispatcher.stream("llama", backend.stream)))[0] == "llama-1:0"
    assert backend.cancelled == ["llama-0"]
    assert backend.closed == ["llama-0", "llama-1"]


async def test_the_attempt_timeout_does_not_cut_a_stream_that_has_started() -> None:
    dispatcher = make_dispatcher(deployment("llama", attempt_timeout_s=0.05))

    async def slow_tokens(info: AttemptInfo) -> AsyncIterator[str]:
        for i in range(3):
            yield str(i)
            await asyncio.sleep(0.06)  # slower between tokens than the attempt timeout

    assert await collect(dispatcher.stream("llama", slow_tokens)) == ["0", "1", "2"]


async def test_a_stream_falls_back_along_the_chain() -> None:
    dispatcher = make_dispatcher(
        deployment("llama", 2, fallbacks=("backup",)), deployment("backup", 1)
    )
    backend = Backend({"llama-0": "fail", "llama-1": "fail"})
    assert (await collect(dispatcher.stream("llama", backend.stream)))[0] == "backup-0:0"


async def test_closing_a_stream_early_closes_the_attempt_and_frees_the_replica() -> None:
    dispatcher = make_dispatcher(deployment("llama", 1))
    backend = Backend({})
    items = dispatcher.stream("llama", backend.stream)
    assert await anext(items) == "llama-0:0"
    assert outstanding(dispatcher) == {"llama-0": 1}
    await items.aclose()
    assert backend.closed == ["llama-0"]
    assert outstanding(dispatcher) == {"llama-0": 0}


# ---- names -----------------------------------------------------------------------------------


def test_aliases_split_by_weight_and_tasks_route() -> None:
    dispatcher = make_dispatcher(
        deployment("stable", 1),
        deployment("canary", 1),
        aliases={"chat": {"stable": 9.0, "canary": 1.0}},
        tasks={"chat": "chat", "code": "canary"},
    )
    picks = [dispatcher.resolve("chat") for _ in range(5000)]
    assert abs(picks.count("canary") / 5000 - 0.1) < 0.03
    assert dispatcher.resolve("", task="code") == "canary"
    assert dispatcher.resolve("", task="chat") in {"stable", "canary"}
    sticky = {dispatcher.resolve("chat", key="user-7") for _ in range(20)}
    assert len(sticky) == 1
    with pytest.raises(
        NotFound, match=r"task 'poetry' has no route; tasks routed: \['chat', 'code'\]"
    ):
        dispatcher.resolve("", task="poetry")
    with pytest.raises(NotFound, match=r"'llama' is neither a deployment nor an alias"):
        dispatcher.resolve("llama")
    with pytest.raises(InvalidArgument, match="set a model, or a task"):
        dispatcher.resolve("")


async def test_reconfigure_keeps_the_breakers_of_replicas_that_stay() -> None:
    dispatcher = make_dispatcher(deployment("llama", 2))
    backend = Backend({"llama-0": "fail"})
    for _ in range(2):
        await dispatcher.unary("llama", backend.unary)
    assert state(dispatcher, "llama", "llama-0") is BreakerState.OPEN
    dispatcher.reconfigure(RoutingConfig(deployments=(deployment("llama", 3),)).validate())
    assert state(dispatcher, "llama", "llama-0") is BreakerState.OPEN
    assert state(dispatcher, "llama", "llama-2") is BreakerState.CLOSED


def test_reconfigure_keeps_rotation_state_when_a_weight_changes() -> None:
    import dataclasses

    config = deployment("llama", 2)
    dispatcher = make_dispatcher(config)
    dispatcher.set_healthy("llama", "llama-0", False)
    heavier = dataclasses.replace(
        config,
        replicas=(dataclasses.replace(config.replicas[0], weight=3.0), config.replicas[1]),
    )
    dispatcher.reconfigure(RoutingConfig(deployments=(heavier,)).validate())
    assert dispatcher.replica("llama", "llama-0").config.weight == 3.0
    assert not dispatcher.replica("llama", "llama-0").healthy
    assert dispatcher.replica("llama", "llama-1").healthy


async def test_reconfigure_during_a_call_keeps_the_outstanding_count_right() -> None:
    dispatcher = make_dispatcher(deployment("llama", 1))
    gate = asyncio.Event()

    entered = asyncio.Event()

    async def attempt(info: AttemptInfo) -> str:
        entered.set()
        await gate.wait()
        return "ok"

    call = asyncio.ensure_future(dispatcher.unary("llama", attempt))
    await entered.wait()
    dispatcher.reconfigure(RoutingConfig(deployments=(deployment("llama", 2),)).validate())
    assert outstanding(dispatcher) == {"llama-0": 1, "llama-1": 0}
    gate.set()
    assert await call == "ok"
    assert outstanding(dispatcher) == {"llama-0": 0, "llama-1": 0}


async def test_with_hedging_on_a_failed_attempt_is_still_retried() -> None:
    dispatcher = make_dispatcher(deployment("llama", 3, hedge_delay_s=0.5))
    backend = Backend({"llama-0": "fail", "llama-1": "reset"})
    assert await dispatcher.unary("llama", backend.unary) == "answer from llama-2"
    assert backend.calls == ["llama-0", "llama-1", "llama-2"]
    failures = [r.breaker.window_failures for r in dispatcher.health()["llama"].replicas]
    assert failures == [1, 1, 0]


async def test_with_hedging_on_the_callers_deadline_still_holds() -> None:
    dispatcher = make_dispatcher(deployment("llama", 2, hedge_delay_s=0.02))
    backend = Backend({"llama-0": "hang", "llama-1": "hang"})
    with pytest.raises(DeadlineExceeded, match="after 2 attempt"):
        await dispatcher.unary("llama", backend.unary, timeout_s=0.3)
    assert sorted(backend.cancelled) == ["llama-0", "llama-1"]
    assert outstanding(dispatcher) == {"llama-0": 0, "llama-1": 0}


async def test_an_attempt_that_fails_to_open_its_stream_is_retried() -> None:
    dispatcher = make_dispatcher(deployment("llama", 2))
    backend = Backend({})

    def opener(info: AttemptInfo) -> AsyncIterator[str]:
        if info.replica.name == "llama-0":
            raise ConnectionRefusedError("llama-0 refused the connection")
        return backend.stream(info)

    assert (await collect(dispatcher.stream("llama", opener)))[0] == "llama-1:0"
    assert outstanding(dispatcher) == {"llama-0": 0, "llama-1": 0}
    assert dispatcher.health()["llama"].replicas[0].breaker.window_failures == 1

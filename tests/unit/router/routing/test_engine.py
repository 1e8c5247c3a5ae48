"""RoutedEngine: a deployment as one generation engine over its replicas' engines. The replica
engines here are small asyncio doubles that answer, fail before their first chunk, or stall on
purpose; the dispatcher and the routing policy under them are the real ones."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator

import pytest

from backends.base import SamplingParams
from router.errors import Unavailable
from router.routing.config import (
    DeploymentConfig,
    HedgingConfig,
    ReplicaConfig,
    RetryConfig,
    RoutingConfig,
)
from router.routing.dispatch import Dispatcher
from router.routing.engine import RoutedEngine
from router.scheduler.generation import Chunk, GenerationEngine
from router.scheduler.request import Request, RequestStatus


class Replica:
    """A replica's engine: 'ok' streams three chunks, 'fail' raises before the first, 'stall'
    waits `stall_s` before answering."""

    def __init__(self, name: str, mode: str = "ok", stall_s: float = 0.0) -> None:
        self.name = name
        self.mode = mode
        self.stall_s = stall_s
        self.seen: list[Request] = []
        self.closed = 0
        self.live = 0

    @property
    def num_unfinished(self) -> int:
        return self.live

    num_active = num_unfinished

    def start(self) -> None: ...

    def stop(self) -> None: ...

    last_output_at = 0.0

    async def ready(self, timeout_s: float | None = None) -> bool:
        return True

    async def generate(self, request: Request) -> AsyncGenerator[Chunk, None]:
        self.seen.append(request)
        self.live += 1
        try:
            if self.mode == "fail":
                raise Unavailable(f"{self.name} is down")
            await asyncio.sleep(self.stall_s)
            for i in range(3):
                status = RequestStatus.FINISHED_STOPPED if i == 2 else RequestStatus.RUNNING
                yield Chunk((i,), f"{self.name}{i} ", status)
        finally:
            self.live -= 1
            self.closed += 1


def engine_over(
    replicas: dict[str, Replica], *, hedge_delay_s: float = 0.0
) -> tuple[RoutedEngine, Dispatcher]:
    deployment = DeploymentConfig(
        "d",
        tuple(ReplicaConfig(name) for name in replicas),
        balancer="round_robin",
        retry=RetryConfig(max_attempts=3, min_retries_per_s=100.0),
        hedging=HedgingConfig(delay_s=hedge_delay_s),
    )
    dispatcher = Dispatcher(
        RoutingConfig(deployments=(deployment,)).validate(), rng=random.Random(0)
    )
    ids = iter(range(100, 1000))

    def lookup(dep: str, name: str) -> GenerationEngine:
        assert dep == "d"
        return replicas[name]

    engine = RoutedEngine(
        "d",
        dispatcher,
        lookup,
        lambda: list(replicas.values()),
        lambda: next(ids),
        hedged=hedge_delay_s > 0,
    )
    return engine, dispatcher


def request(*, unary: bool = False) -> Request:
    return Request("r1", 1, [1, 2, 3], SamplingParams(max_tokens=8), unary=unary)


async def test_a_failed_first_attempt_is_retried_with_a_fresh_request() -> None:
    down, up = Replica("down", "fail"), Replica("up")
    engine, dispatcher = engine_over({"down": down, "up": up})
    original = request()
    text = "".join([c.text async for c in engine.generate(original)])
    assert text == "up0 up1 up2 "
    assert down.seen == [original]  # round robin: the first attempt went to 'down'
    (retried,) = up.seen
    assert retried is not original and retried.engine_id == 100
    assert retried.prompt_ids == original.prompt_ids and retried.params == original.params
    assert down.closed == up.closed == 1 and engine.num_unfinished == 0
    assert original.served_by == "up"  # the replica that answered: what usage bills by
    health = dispatcher.health()["d"]
    assert [r.outstanding for r in health.replicas] == [0, 0]
    assert await engine.ready()


async def test_a_unary_call_is_hedged_on_another_replica() -> None:
    slow, fast = Replica("slow", stall_s=30.0), Replica("fast")
    engine, _ = engine_over({"slow": slow, "fast": fast}, hedge_delay_s=0.05)
    started = time.perf_counter()
    chunks = [c async for c in engine.generate(request(unary=True))]
    assert time.perf_counter() - started < 5.0
    assert "".join(c.text for c in chunks) == "fast0 fast1 fast2 "
    assert chunks[-1].status is RequestStatus.FINISHED_STOPPED
    # The losing attempt was cancelled and its stream closed: nothing is left running.
    assert slow.closed == 1 and slow.live == 0 and engine.num_unfinished == 0


async def test_streams_are_not_hedged() -> None:
    slow, fast = Replica("slow", stall_s=0.3), Replica("fast")
    engine, _ = engine_over({"slow": slow, "fast": fast}, hedge_delay_s=0.05)
    chunks = [c async for c in engine.generate(request(unary=False))]
    assert "".join(c.text for c in chunks) == "slow0 slow1 slow2 "
    assert fast.seen == []


async def test_all_replicas_failing_is_unavailable_naming_the_deployment() -> None:
    engine, _ = engine_over({"a": Replica("a", "fail"), "b": Replica("b", "fail")})
    with pytest.raises(Unavailable, match="deployment 'd' could not answer after 2 attempt"):
        [c async for c in engine.generate(request())]

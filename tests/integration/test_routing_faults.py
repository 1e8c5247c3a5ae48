"""Routing under real faults: a deployment of two llama-cpp-python servers (real processes on
loopback, the SmolLM2 GGUF) behind an in-process router, with one server killed, hung or both
gone while calls stream.

What is proven, each against real processes and sockets:

- **Kill -9 under load** (`test_a_replica_killed_under_load_...`): with streamed Generate calls
  in flight on both replicas, SIGKILL one. No call that had not streamed a chunk yet fails (those
  are retried on the survivor); a call that fails had streamed at least one chunk and ends with
  UNAVAILABLE; every call that succeeds is whole, with nothing repeated (at most max_tokens
  tokens and a finish reason); calls keep succeeding on the survivor; the killed replica's
  breaker opens (ListModels and `irouter_breaker_transitions_total{state="open"}`) and it
  leaves the rotation (health checks). Restarted on the same port, it comes back: healthy and
  CLOSED in ListModels after a probe went through it, and calls reach it again.
- **A hung replica** (`test_a_hung_replica_...`): SIGSTOP one server. Calls still succeed,
  each within about the per-attempt timeout plus normal latency, retried on the other replica
  (`irouter_routing_failed_attempts_total` counts the abandoned attempts); the hung one leaves
  the rotation, and returns after SIGCONT.
- **All replicas down** (`test_all_replicas_down_...`): with both servers killed, 50 concurrent
  calls fail at once with UNAVAILABLE naming the deployment; once the router knows (breakers open,
  health checks failing), 50 more fail in well under a second, each with a
  `google.rpc.RetryInfo`, and no call is left outstanding on any replica: nothing queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from backends.openai.config import OpenAIHttpConfig
from router.config import ModelConfig
from router.models.prepare import smollm2_gguf_path
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.routing.config import (
    BalancerKind,
    BreakerConfig,
    DeploymentConfig,
    HealthCheckConfig,
    ReplicaConfig,
    RetryConfig,
    RoutingConfig,
)
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config, running
from tests.openai_servers import OpenAIServer, llama_cpp_missing, running_llama_server

DEP = "chat"
MAX_TOKENS = 6
PROMPTS = ("What is the capital of France?", "Name a color.", "Say hello.")
LONG_PROMPT = ", ".join(str(n) for n in range(1, 11)) + ","
"""A raw prompt the model continues for as long as it may: asked in a chat to count to 1,000,
it stopped by itself after 122 tokens, which a loaded CI machine streamed before 4 health checks."""


@pytest.fixture(scope="module")
def llamas() -> Iterator[tuple[OpenAIServer, OpenAIServer]]:
    """Two llama-cpp-python servers of our own (the session's shared one must not be killed),
    started side by side."""
    reason = llama_cpp_missing()
    if reason:
        pytest.skip(reason)
    gguf = smollm2_gguf_path()
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        # One thread for prompts too: two servers whose threads spin-wait for each other on
        # two cores would crawl (seconds per call).
        managers = [running_llama_server(gguf, threads=1, threads_batch=1) for _ in range(2)]
        a, b = pool.map(stack.enter_context, managers)
        yield a, b


@pytest.fixture
def servers(llamas: tuple[OpenAIServer, OpenAIServer]) -> tuple[OpenAIServer, OpenAIServer]:
    """The two servers, running and answering whatever an earlier test did to them."""
    for server in llamas:
        server.resume()
        if not server.alive:
            server.restart()
    return llamas


def deployment(
    servers: Sequence[OpenAIServer],
    *,
    balancer: BalancerKind = "p2c",
    breaker: BreakerConfig,
    retry: RetryConfig,
    health_check: HealthCheckConfig,
) -> RoutingConfig:
    replicas = tuple(
        ReplicaConfig(name=f"r{i}", backend="openai_http", url=s.url, remote_model=s.model)
        for i, s in enumerate(servers)
    )
    return RoutingConfig(
        deployments=(
            DeploymentConfig(
                name=DEP,
                model=GEN,
                replicas=replicas,
                balancer=balancer,
                breaker=breaker,
                retry=retry,
                health_check=health_check,
            ),
        )
    )


@contextlib.asynccontextmanager
async def routed(
    model_cache: Path, data_dir: Path, servers: Sequence[OpenAIServer], routing: RoutingConfig
) -> AsyncIterator[tuple[RouterServer, pb_grpc.InferenceServiceStub]]:
    """A router whose deployment DEP has one openai_http replica per server, all in rotation."""
    config = make_config(
        model_cache,
        data_dir,
        ModelConfig(
            name=GEN,
            kind="generate",
            artifact=GEN,  # the tokenizer and chat template
            backend="openai_http",
            max_slots=8,
            max_waiting=64,
            max_context=1024,
            # The dialect for every replica; no url or model: each replica gives its own.
            remote=OpenAIHttpConfig(dialect="llama.cpp", read_timeout_s=30),
        ),
        retrieval=False,
        routing=routing,
    )
    async with running(config) as server:
        listed = await replicas_of(server)
        assert all(r.healthy for r in listed.values()), {n: r.error for n, r in listed.items()}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, pb_grpc.InferenceServiceStub(channel)


async def replicas_of(server: RouterServer) -> dict[str, pb.ReplicaInfo]:
    """ListModels' view of DEP's replicas, by name (asked over gRPC, as a client would)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
    (model,) = [m for m in answer.models if m.name == DEP]
    return {r.name: r for r in model.replicas}


def metric(server: RouterServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, {"deployment": DEP, **labels}) or 0.0


async def wait_for(what: str, predicate: Callable[[], object], timeout_s: float) -> float:
    """Poll `predicate` (sync or async) until true; the seconds it took."""
    started = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


def request(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=DEP,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        cache_mode=pb.CACHE_MODE_BYPASS,
    )


@dataclass
class Call:
    """One streamed Generate call, as its client saw it."""

    prompt: str
    started: float
    id: str = ""
    ended: float = 0.0
    chunks: int = 0
    text: str = ""
    finish_reason: int = 0
    completion_tokens: int = 0
    code: grpc.StatusCode | None = None
    """None: the call succeeded."""
    details: str = ""
    error: grpc.aio.AioRpcError | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


async def generate(stub: pb_grpc.InferenceServiceStub, prompt: str, timeout_s: float = 60) -> Call:
    call = Call(prompt, time.monotonic())
    try:
        # grpc.aio's streams (the generated stubs are typed for the blocking client).
        stream = cast(
            AsyncIterator[pb.GenerateResponse], stub.Generate(request(prompt), timeout=timeout_s)
        )
        async for chunk in stream:
            call.chunks += 1
            call.id = chunk.id
            call.text += chunk.text
            if chunk.finish_reason:
                call.finish_reason = chunk.finish_reason
                call.completion_tokens = chunk.usage.completion_tokens
    except grpc.aio.AioRpcError as error:
        call.code, call.details, call.error = error.code(), error.details() or "", error
    call.ended = time.monotonic()
    return call


async def both(stub: pb_grpc.InferenceServiceStub) -> list[Call]:
    """Two calls at once: one on each replica (p2c and round_robin alike)."""
    return list(await asyncio.gather(generate(stub, PROMPTS[0]), generate(stub, PROMPTS[1])))


def assert_answered(call: Call) -> None:
    """A successful, whole answer with nothing repeated: a retry after a streamed chunk would
    add a second answer's tokens to the first one's, past max_tokens.

    (Not compared with a reference text: llama-cpp-python's server itself answers a prompt
    differently when it is sent twice in a row, as it reuses its KV cache for the repeat.)"""
    assert call.code is None, f"{call.code}: {call.details}"
    assert call.text, call
    assert call.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), call
    assert 1 <= call.completion_tokens <= MAX_TOKENS, call
    assert call.chunks <= MAX_TOKENS + 1, call


async def test_a_replica_killed_under_load_fails_only_calls_already_streaming_and_comes_back(
    servers: tuple[OpenAIServer, OpenAIServer],
    model_cache: Path,
    tmp_path: Path,
) -> None:
    routing = deployment(
        servers,
        breaker=BreakerConfig(consecutive_failures=2, cooldown_s=1.0, max_cooldown_s=2.0),
        retry=RetryConfig(max_attempts=3),
        # A busy llama-cpp-python server answers /v1/models only between two generations (the
        # same lock): a long check timeout, or the survivor would leave the rotation under load.
        health_check=HealthCheckConfig(interval_s=0.2, timeout_s=10, unhealthy_after=2),
    )
    victim = servers[1]
    async with routed(model_cache, tmp_path, servers, routing) as (server, stub):
        calls: list[Call] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            n = i
            while not stop.is_set():
                calls.append(await generate(stub, PROMPTS[n % len(PROMPTS)]))
                n += 1

        dispatcher = server.models.dispatcher
        assert dispatcher is not None

        def outstanding(replica: str) -> int:
            return dispatcher.replica(DEP, replica).outstanding

        for call in await both(stub):  # first calls on each server, before the clock runs
            assert_answered(call)
        clients = [asyncio.create_task(client(i)) for i in range(4)]
        try:
            # Steady load first, then the kill while calls are queued or streaming on r1 (two
            # at least: its failures alone then reach consecutive_failures).
            await wait_for("10 calls answered", lambda: len(calls) >= 10, 60)
            await wait_for("2 calls on r1", lambda: outstanding("r1") >= 2, 30)
            victim.kill()
            killed_at = time.monotonic()

            async def out_of_rotation() -> bool:
                r1 = (await replicas_of(server))["r1"]
                return r1.circuit_state == pb.CIRCUIT_STATE_OPEN
                # (healthy turns False too, on its own clock: asserted below)

            # Its queued calls fail at once (connections reset): two of them open the breaker.
            await wait_for("r1's breaker open", out_of_rotation, 5)
            assert metric(server, "irouter_breaker_transitions_total", replica="r1", state="open")
            assert not metric(
                server, "irouter_breaker_transitions_total", replica="r0", state="open"
            )
            await wait_for(
                "r1 failing its health checks", lambda: _healthy(server, "r1", False), 10
            )
            opened_at = time.monotonic()
            # The survivor answers everything meanwhile.
            await wait_for(
                "4 calls answered after the breaker opened",
                lambda: sum(c.started > opened_at and c.ended > 0 for c in calls) >= 4,
                30,
            )

            # Back on the same port: health checks put it back in rotation, the breaker
            # half-opens after its cool-down, and a probe call through it closes it.
            await asyncio.to_thread(victim.restart)
            restarted_at = time.monotonic()

            async def back() -> bool:
                r1 = (await replicas_of(server))["r1"]
                return r1.healthy and r1.circuit_state == pb.CIRCUIT_STATE_CLOSED

            took = await wait_for("r1 healthy and closed again", back, 30)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert metric(server, "irouter_breaker_transitions_total", replica="r1", state="closed")

        t0 = calls[0].started if calls else 0.0
        timeline = "\n".join(
            f"{c.started - t0:7.2f} {c.seconds:6.2f}s {c.id} chunks={c.chunks} {c.code} "
            f"{c.details[:80]}"
            for c in sorted(calls, key=lambda c: c.started)
        )
        print(f"\nkilled at {killed_at - t0:.2f}\n{timeline}")
        before = [c for c in calls if c.ended < killed_at]
        after = [c for c in calls if c.started > killed_at]
        failed = [c for c in calls if c.code is not None]
        assert len(before) >= 10 and all(c.code is None for c in before)
        # Only calls that were already streaming from r1 may fail, and those end UNAVAILABLE
        # naming the replica rather than with a repeated or truncated answer.
        for call in failed:
            assert call.chunks >= 1, f"failed before its first chunk: {call.details}"
            assert call.code == grpc.StatusCode.UNAVAILABLE, call.details
            assert f"{DEP}/r1" in call.details or "'r1'" in call.details, call.details
        assert len(failed) <= 1  # r1 streams one answer at a time
        # The calls queued on r1 (nothing streamed yet) were retried on r0.
        assert metric(server, "irouter_routing_failed_attempts_total", replica="r1") >= 1
        for call in calls:
            if call.code is None:
                assert_answered(call)
        assert len(after) >= 6 and all(c.code is None for c in after if c.started > opened_at)

        # Calls reach r1 again: of four at once, p2c sends about half to it.
        seen_on_r1 = 0

        async def watch() -> None:
            nonlocal seen_on_r1
            while True:
                seen_on_r1 = max(seen_on_r1, outstanding("r1"))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            again = await asyncio.gather(*(generate(stub, p) for p in PROMPTS * 2))
        finally:
            watcher.cancel()
        for call in again:
            assert_answered(call)
        assert seen_on_r1 >= 1
        listed = await replicas_of(server)
        assert all(r.outstanding == 0 and r.healthy for r in listed.values())
        print(f"\nkill: {len(calls)} calls, {len(failed)} failed mid-stream, back {took:.1f}s "
              f"after the restart ({time.monotonic() - restarted_at:.1f}s)")  # fmt: skip


async def test_a_hung_replica_is_timed_out_and_retried_on_the_other(
    servers: tuple[OpenAIServer, OpenAIServer],
    model_cache: Path,
    tmp_path: Path,
) -> None:
    attempt_timeout_s = 1.5
    routing = deployment(
        servers,
        balancer="round_robin",  # r0, r1, r0 ...: each pair of calls below has one on each
        breaker=BreakerConfig(consecutive_failures=2, cooldown_s=30, max_cooldown_s=30),
        retry=RetryConfig(max_attempts=3, attempt_timeout_s=attempt_timeout_s),
        health_check=HealthCheckConfig(interval_s=0.5, timeout_s=5, unhealthy_after=2),
    )
    hung = servers[1]
    async with routed(model_cache, tmp_path, servers, routing) as (server, stub):
        baseline = await both(stub)
        for call in baseline:
            assert_answered(call)
        normal = max(c.seconds for c in baseline)
        hung.pause()
        try:
            # Pairs of calls at once: the first pair puts one call on each replica, so one of
            # them waits on the hung server until its attempt times out.
            rounds: list[list[Call]] = []
            for i in range(3):
                prompts = (PROMPTS[i], PROMPTS[(i + 1) % len(PROMPTS)])
                rounds.append(list(await asyncio.gather(*(generate(stub, p) for p in prompts))))
            failed_attempts = metric(server, "irouter_routing_failed_attempts_total", replica="r1")
            listed = await replicas_of(server)
        finally:
            hung.resume()
        # Each call: at most one attempt lost to the hung server, then the healthy one (which
        # may first finish the pair's other call): generous bounds for a loaded 2-core machine,
        # far below the read timeout (30 s) that a call without attempt timeouts would wait.
        bound = attempt_timeout_s + 2 * normal + 2.5
        for pair in rounds:
            for call in pair:
                assert_answered(call)
                assert call.seconds < bound, (call.seconds, bound, normal)
        assert max(c.seconds for c in rounds[0]) > attempt_timeout_s  # the hang was met
        assert failed_attempts >= 1
        r1 = listed["r1"]
        assert r1.circuit_state == pb.CIRCUIT_STATE_OPEN or not r1.healthy, r1
        assert listed["r0"].healthy and listed["r0"].circuit_state == pb.CIRCUIT_STATE_CLOSED
        # Resumed, it passes its health checks again.
        await wait_for("r1 healthy after SIGCONT", lambda: _healthy(server, "r1"), 20)
        print(f"\nhang: normal {normal:.2f}s, calls "
              f"{[round(c.seconds, 2) for p in rounds for c in p]}")  # fmt: skip


async def _healthy(server: RouterServer, replica: str, healthy: bool = True) -> bool:
    return (await replicas_of(server))[replica].healthy is healthy


async def test_all_replicas_down_fails_fast_with_retry_info_and_queues_nothing(
    servers: tuple[OpenAIServer, OpenAIServer],
    model_cache: Path,
    tmp_path: Path,
) -> None:
    routing = deployment(
        servers,
        breaker=BreakerConfig(consecutive_failures=2, cooldown_s=30, max_cooldown_s=30),
        retry=RetryConfig(max_attempts=2),
        health_check=HealthCheckConfig(interval_s=0.2, timeout_s=0.5, unhealthy_after=1),
    )
    async with routed(model_cache, tmp_path, servers, routing) as (server, stub):
        for s in servers:
            s.kill()
        # Before the router knows: every call still fails at once (connections refused).
        started = time.monotonic()
        unknowing = await asyncio.gather(*(generate(stub, "hi", 10) for _ in range(50)))
        first_wave = time.monotonic() - started
        for call in unknowing:
            # UNAVAILABLE, not DEADLINE_EXCEEDED: refused connections, no waiting on a timeout
            assert call.code == grpc.StatusCode.UNAVAILABLE, call.details
            assert f"'{DEP}'" in call.details, call.details
            assert call.chunks == 0

        async def all_out() -> bool:
            listed = await replicas_of(server)
            return all(
                r.circuit_state == pb.CIRCUIT_STATE_OPEN or not r.healthy for r in listed.values()
            )

        await wait_for("both replicas out of rotation", all_out, 10)

        def attempts() -> float:
            return sum(
                metric(server, "irouter_routing_attempts_total", replica=r) for r in ("r0", "r1")
            )

        attempted = attempts()
        started = time.monotonic()
        calls = await asyncio.gather(*(generate(stub, "hi", 10) for _ in range(50)))
        second_wave = time.monotonic() - started
        for call in calls:
            assert call.code == grpc.StatusCode.UNAVAILABLE, call.details
            assert f"no replica of deployment '{DEP}'" in call.details, call.details
            assert f"{DEP}/r0" in call.details and f"{DEP}/r1" in call.details, call.details
            assert call.error is not None
            status = rpc_status.from_call(call.error)
            assert status is not None
            infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert len(infos) == 1
            info = error_details_pb2.RetryInfo()
            infos[0].Unpack(info)
            assert info.retry_delay.ToTimedelta().total_seconds() > 0
        # Once the router knows, nothing is tried: no connection, no queue, no attempt.
        assert attempts() == attempted
        listed = await replicas_of(server)
        assert [r.outstanding for r in listed.values()] == [0, 0]
        for name in ("r0", "r1"):
            assert metric(server, "irouter_replica_outstanding", replica=name) == 0
        print(f"\nall down: 50 calls {first_wave:.2f}s before the router knew, "
              f"{second_wave:.2f}s after")  # fmt: skip


async def test_a_busy_replica_answering_a_long_completion_stays_in_rotation(
    servers: tuple[OpenAIServer, OpenAIServer],
    model_cache: Path,
    tmp_path: Path,
) -> None:
    """llama.cpp's server answers /v1/models only between two generations, so every probe made
    while it streams one long answer times out. The replica is busy, not dead: it must stay in
    rotation and take the next call (before, two timed-out probes took the only replica out and
    every new call to the deployment failed at once with UNAVAILABLE)."""
    busy = servers[:1]
    routing = deployment(
        busy,
        breaker=BreakerConfig(consecutive_failures=2, cooldown_s=30, max_cooldown_s=30),
        retry=RetryConfig(max_attempts=1),
        health_check=HealthCheckConfig(interval_s=0.2, timeout_s=0.3, unhealthy_after=2),
    )
    async with routed(model_cache, tmp_path, busy, routing) as (server, stub):

        def checks(*results: str) -> float:
            return sum(
                metric(server, "irouter_replica_health_checks_total", replica="r0", result=r)
                for r in results or ("pass", "fail")
            )

        long = pb.GenerateRequest(
            model=DEP,
            # A long answer (llama.cpp's server cannot ignore_eos): the model counts on. About
            # 100 tokens stream during the 4 checks (AMD EPYC Zen 4): 600 leave a wide margin.
            prompt=LONG_PROMPT,
            sampling=pb.SamplingParams(max_tokens=600, temperature=0.0),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
        tokens = 0

        async def stream_long() -> pb.GenerateResponse:
            nonlocal tokens
            last = pb.GenerateResponse()
            async for chunk in cast(
                AsyncIterator[pb.GenerateResponse], stub.Generate(long, timeout=120)
            ):
                tokens += 1
                last = chunk
            return last

        answering = asyncio.create_task(stream_long())
        await wait_for("the long answer streams", lambda: tokens >= 5, 60)
        before, failed_before = checks(), checks("fail")
        await wait_for("4 health checks during the long answer", lambda: checks() >= before + 4, 30)
        assert not answering.done(), "the answer ended before the checks: make it longer"
        assert checks("fail") == failed_before  # each probe timed out, yet tokens streamed
        listed = await replicas_of(server)
        assert listed["r0"].healthy, listed["r0"].error
        # A new call is taken (llama.cpp queues it behind the long answer), not refused.
        call = await generate(stub, PROMPTS[1], timeout_s=120)
        assert_answered(call)
        last = await answering
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED, last

"""Admission by expected wait on a real engine (issue 17, item 4): once the model has a measured
rate under full load, a call that would wait past max_queue_wait_s is shed at once with a
RetryInfo, while the calls admitted finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.scheduler.admission import MIN_DEPARTURES
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config, running, wait_drained

SLOTS = 2
BOUND_S = 0.5


@pytest.fixture(scope="module")
async def server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    model = ModelConfig(
        name=GEN,
        kind="generate",
        artifact=GEN,
        max_slots=SLOTS,
        max_waiting=200,
        max_context=512,
        max_queue_wait_s=BOUND_S,
    )
    config = make_config(model_cache, tmp_path_factory.mktemp("data"), model, retrieval=False)
    async with running(config) as router:
        yield router


def ask(n: int) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=GEN,
        prompt="Count:",
        sampling=pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
        cache_mode=pb.CACHE_MODE_BYPASS,
    )


async def outcome(stub: pb_grpc.InferenceServiceStub, n: int) -> grpc.aio.AioRpcError | None:
    try:
        await stub.Complete(ask(n), timeout=120)
    except grpc.aio.AioRpcError as error:
        return error
    return None


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    return info.retry_delay.ToTimedelta().total_seconds()


async def test_before_any_rate_is_known_no_call_waits_past_the_bound_for_a_slot(
    server: RouterServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        results = await asyncio.gather(*(outcome(stub, 24) for _ in range(40)))
    shed = [e for e in results if e is not None]
    assert shed and len(shed) < len(results)
    for error in shed:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "found no slot for this call in time" in (error.details() or ""), error.details()
        assert retry_delay_s(error) > 0
    await wait_drained(server)  # the shed requests leave the engine thread at its next step


async def test_calls_past_the_expected_wait_are_shed_with_retry_info(
    server: RouterServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        # Learn the rate: waves of one call more than the slots, so that calls leave while
        # every slot is taken, and the one waiting waits about one call (within the bound).
        for _ in range(MIN_DEPARTURES):
            await asyncio.gather(*(outcome(stub, 16) for _ in range(SLOTS + 1)))
        results = await asyncio.gather(*(outcome(stub, 16) for _ in range(60)))
    shed = [e for e in results if e is not None]
    assert shed, "60 calls on 2 slots with a 0.5 s bound: some must be shed"
    assert len(shed) < len(results), "the calls a slot frees up for within the bound run"
    for error in shed:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        # Most at once, from the estimate; an estimate that was low is caught by the bound.
        details = error.details() or ""
        assert "would wait about" in details or "found no slot" in details, details
        assert retry_delay_s(error) > 0
    at_once = [e for e in shed if "would wait about" in (e.details() or "")]
    assert len(at_once) > len(shed) / 2, [e.details() for e in shed]
    engine = server.models.get(GEN, "generate").engine
    assert engine is not None and engine.num_unfinished == 0

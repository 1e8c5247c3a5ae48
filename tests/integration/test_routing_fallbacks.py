"""The issue's fallback chain, served for real: ONNX Runtime → OpenVINO → a remote llama.cpp
server, three deployments of the same model, each with room for one call. Three calls at once:
the first runs on ONNX Runtime, the engines that are full shed the others (RESOURCE_EXHAUSTED),
and each moves down the chain until an engine with room takes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.routing.config import DeploymentConfig, HealthCheckConfig, ReplicaConfig, RoutingConfig
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config
from tests.openai_servers import OpenAIServer

QUIET = HealthCheckConfig(interval_s=0)  # a busy llama.cpp server answers no probe


@pytest.fixture(scope="module")
async def server(
    llama: OpenAIServer, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    one_call = ModelConfig(
        name=GEN,
        kind="generate",
        artifact=GEN,
        max_slots=1,
        max_waiting=0,
        max_context=512,
        token_budget=128,
    )
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("c"),
        one_call,
        retrieval=False,
        routing=RoutingConfig(
            deployments=(
                DeploymentConfig(
                    name="ort",
                    model=GEN,
                    replicas=(ReplicaConfig(name="cpu"),),
                    fallbacks=("ov",),
                    health_check=QUIET,
                ),
                DeploymentConfig(
                    name="ov",
                    model=GEN,
                    replicas=(ReplicaConfig(name="cpu", backend="openvino", device="CPU"),),
                    fallbacks=("remote",),
                    health_check=QUIET,
                ),
                DeploymentConfig(
                    name="remote",
                    model=GEN,
                    replicas=(
                        ReplicaConfig(
                            name="llama",
                            backend="openai_http",
                            url=llama.url,
                            remote_model=llama.model,
                        ),
                    ),
                    health_check=QUIET,
                ),
            )
        ),
    )
    router = RouterServer(config)
    await router.start()
    await router.wait_ready()
    assert all(r.ready for r in router.models.replicas()), [
        r.error for r in router.models.replicas()
    ]
    yield router
    await router.stop(0)


async def test_calls_move_down_the_chain_when_engines_are_full(server: RouterServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def call(i: int) -> list[pb.GenerateResponse]:
            request = pb.GenerateRequest(
                model="ort",
                prompt=f"Write a list of {i + 3} fruits:",
                sampling=pb.SamplingParams(max_tokens=16, temperature=0.0),
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
            return [chunk async for chunk in stub.Generate(request)]

        answers = await asyncio.gather(*(call(i) for i in range(3)))
    for chunks in answers:
        assert "".join(c.text for c in chunks)
        assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    failed = server.metrics.registry.get_sample_value
    # Two calls were shed by ONNX Runtime, one of them by OpenVINO too, and nothing else failed.
    assert (
        failed("irouter_routing_failed_attempts_total", {"deployment": "ort", "replica": "cpu"})
        == 2
    )
    assert (
        failed("irouter_routing_failed_attempts_total", {"deployment": "ov", "replica": "cpu"}) == 1
    )
    assert (
        failed(
            "irouter_routing_failed_attempts_total", {"deployment": "remote", "replica": "llama"}
        )
        is None
    )
    # Shedding is not the replica's fault: no breaker moved.
    assert (
        failed(
            "irouter_breaker_transitions_total",
            {"deployment": "ort", "replica": "cpu", "state": "open"},
        )
        is None
    )

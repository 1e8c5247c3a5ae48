"""`backend: openvino` models served through the real gRPC server: the SmolLM2 decoder on
OpenVINO GenAI continuous batching (a request engine) and MiniLM on OpenVINO."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends.onnx_runtime import OnnxEncoder
from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.scheduler.request_engine import RequestEngineAdapter
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN, make_config, wait_drained

OV_GEN = "smollm2-openvino"
OV_EMB = "minilm-openvino"
FRANCE = pb.ChatMessages(
    messages=[pb.ChatMessage(role="user", content="What is the capital of France?")]
)


def greedy(max_tokens: int, **extra: object) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def ov_router(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("ov"),
        ModelConfig(
            name=OV_GEN,
            kind="generate",
            artifact=GEN,
            backend="openvino",
            device="CPU",
            max_slots=4,
            max_waiting=2,
            max_context=512,
            token_budget=256,
        ),
        ModelConfig(name=OV_EMB, kind="embed", artifact=EMB, backend="openvino", max_batch=16),
        retrieval=False,
        server={"grace_seconds": 2.0},
    )
    server = RouterServer(config)
    await server.start()
    await server.wait_ready()
    assert all(m.ready for m in server.models), [m.error for m in server.models]
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def ov_channel(ov_router: RouterServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ov_router.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def ov_stub(ov_channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(ov_channel)


async def test_health_is_serving_after_warm_up(
    ov_router: RouterServer, ov_channel: grpc.aio.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(ov_channel)
    for service in ("", OV_GEN, OV_EMB):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    engine = ov_router.models.get(OV_GEN, "generate").engine
    assert isinstance(engine, RequestEngineAdapter)


async def test_generate_streams_and_complete_agrees(ov_stub: pb_grpc.InferenceServiceStub) -> None:
    chunks = [
        c
        async for c in ov_stub.Generate(
            pb.GenerateRequest(
                model=OV_GEN,
                chat=FRANCE,
                sampling=greedy(16),
                return_token_ids=True,
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
        )
    ]
    assert len(chunks) >= 2
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    streamed = "".join(c.text for c in chunks)
    assert streamed.startswith("The capital of France is Paris")
    ids = [t for c in chunks for t in c.token_ids]
    assert last.usage.completion_tokens == len(ids)
    whole = await ov_stub.Complete(
        pb.CompleteRequest(
            model=OV_GEN,
            chat=FRANCE,
            sampling=greedy(16),
            return_token_ids=True,
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    assert whole.text == streamed and list(whole.token_ids) == ids


async def test_stop_string_and_max_tokens(ov_stub: pb_grpc.InferenceServiceStub) -> None:
    cut = await ov_stub.Complete(
        pb.CompleteRequest(
            model=OV_GEN,
            chat=FRANCE,
            sampling=greedy(16, stop=["Paris"]),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == "The capital of France is "
    short = await ov_stub.Complete(
        pb.CompleteRequest(
            model=OV_GEN,
            prompt="Once upon a time",
            sampling=greedy(5, ignore_eos=True),
            return_token_ids=True,
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    assert short.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(short.token_ids) == 5 == short.usage.completion_tokens


async def test_concurrent_streams_each_get_their_own_text(
    ov_stub: pb_grpc.InferenceServiceStub,
) -> None:
    prompts = ["Name a fruit.", "What is 2+2?", "Say hello.", "Name a colour."]

    async def complete(text: str) -> str:
        response = await ov_stub.Complete(
            pb.CompleteRequest(
                model=OV_GEN,
                chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
                sampling=greedy(8),
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
        )
        return response.text

    solo = [await complete(p) for p in prompts]
    together = await asyncio.gather(*(complete(p) for p in prompts))
    assert list(together) == solo


async def test_client_cancel_frees_the_request(
    ov_router: RouterServer, ov_stub: pb_grpc.InferenceServiceStub
) -> None:
    call = ov_stub.Generate(
        pb.GenerateRequest(
            model=OV_GEN,
            prompt="Count slowly:",
            sampling=greedy(400, ignore_eos=True),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    async for _ in call:
        break
    call.cancel()
    await wait_drained(ov_router, OV_GEN)


async def test_embed_matches_onnx_runtime(
    ov_router: RouterServer, ov_stub: pb_grpc.InferenceServiceStub, model_cache: Path
) -> None:
    texts = ["The cat sat on the mat.", "A quick brown fox", "Quantum chromodynamics"]
    response = await ov_stub.Embed(pb.EmbedRequest(model=OV_EMB, texts=texts))
    got = np.array([e.values for e in response.embeddings], dtype=np.float32)
    assert got.shape == (3, 384)
    tokenizer = ov_router.models.get(OV_EMB, "embed").tokenizer
    assert tokenizer is not None
    encoder = OnnxEncoder(model_cache / EMB, threads=1)
    for text, vector in zip(texts, got, strict=True):
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        # This CPU has no bf16, so the device default is f32; 1e-2 also holds for bf16.
        np.testing.assert_allclose(vector, encoder.encode(ids, np.ones_like(ids))[0], atol=1e-2)

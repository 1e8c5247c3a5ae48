"""Models added and removed while the router serves (the life cycle the control plane will
drive): an added model is listed at once, SERVING once warmed up, and answers real calls; a
removed one drains (its stream in flight finishes, new calls are refused) and its name is free;
a model that cannot load, or a name already served, leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.config import ConfigError, ModelConfig
from router.errors import FailedPrecondition, NotFound
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN, make_config

ADDED = "smol-added"


@pytest.fixture
async def served(model_cache: Path, tmp_path: Path) -> AsyncIterator[RouterServer]:
    server = RouterServer(make_config(model_cache, tmp_path))
    await server.start()
    await server.wait_ready()
    yield server
    await server.stop(0)


def complete(model: str, text: str = "What is 2 + 2?", max_tokens: int = 4) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model,
        prompt=text,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        cache_mode=pb.CACHE_MODE_BYPASS,
    )


async def health_of(server: RouterServer, name: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        return int(answer.status)


async def test_a_model_added_at_run_time_serves_and_a_removed_one_drains(
    served: RouterServer,
) -> None:
    config = ModelConfig(name=ADDED, kind="generate", artifact=GEN, max_slots=2, max_context=512)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await served.serving.add_model(config)
        assert await health_of(served, ADDED) == health_pb2.HealthCheckResponse.SERVING
        listed = await stub.ListModels(pb.ListModelsRequest())
        assert {m.name: m.ready for m in listed.models}[ADDED]
        # The same artifact as the built-in model, greedy: the same answer.
        added = await stub.Complete(complete(ADDED))
        builtin = await stub.Complete(complete(GEN))
        assert added.text == builtin.text and added.model == ADDED

        # A stream in flight when the removal starts is answered to its end.
        stream = cast(
            AsyncIterator[pb.GenerateResponse],
            stub.Generate(
                pb.GenerateRequest(
                    model=ADDED,
                    prompt="Count from one to fifty:",
                    sampling=pb.SamplingParams(max_tokens=48, temperature=0, ignore_eos=True),
                )
            ),
        )
        chunks = stream.__aiter__()
        first = await anext(chunks)
        model = next(m for m in served.models if m.name == ADDED)
        removal = asyncio.create_task(served.serving.remove_model(ADDED, grace_s=60))
        async with asyncio.timeout(10):
            while not model.draining:  # the removal has begun
                await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(complete(ADDED))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "being removed" in (refused.value.details() or "")
        rest = [chunk async for chunk in chunks]
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(c.text) > 0 for c in [first, *rest]) > 1
        await removal

        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.Complete(complete(ADDED))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListModels(pb.ListModelsRequest())
        assert ADDED not in {m.name for m in listed.models}
        assert await health_of(served, ADDED) == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        # The built-in models were never touched.
        assert (await stub.Complete(complete(GEN))).text == builtin.text
        # The name is free again.
        await served.serving.add_model(config)
        assert (await stub.Complete(complete(ADDED))).text == builtin.text


async def test_an_embedding_model_is_added_and_removed(served: RouterServer) -> None:
    name = "mini-added"
    await served.serving.add_model(ModelConfig(name=name, kind="embed", artifact=EMB, max_batch=8))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        added = await stub.Embed(pb.EmbedRequest(model=name, texts=["a cat", "a dog"]))
        builtin = await stub.Embed(pb.EmbedRequest(model=EMB, texts=["a cat", "a dog"]))
        for a, b in zip(added.embeddings, builtin.embeddings, strict=True):
            assert list(a.values) == pytest.approx(list(b.values), abs=1e-5)
        await served.serving.remove_model(name, grace_s=5)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.Embed(pb.EmbedRequest(model=name, texts=["a cat"]))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_model_that_cannot_load_leaves_nothing_behind(served: RouterServer) -> None:
    broken = ModelConfig(name="broken", kind="generate", artifact="no-such-artifact")
    with pytest.raises(FailedPrecondition, match=r"model 'broken' could not be served: .*manifest"):
        await served.serving.add_model(broken)
    assert "broken" not in {m.name for m in served.models}
    assert await health_of(served, "broken") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ModelConfig(name=GEN, kind="generate", artifact=GEN), "the name is already served"),
        (ModelConfig(name="x", kind="generate", artifact=GEN, max_slots=0), "max_slots=0"),
        (
            ModelConfig(name="far", kind="generate", artifact=GEN, backend="openai_http"),
            "has backend 'openai_http' and no remote: section",
        ),
    ],
)
async def test_a_bad_model_config_is_refused_by_name(
    served: RouterServer, config: ModelConfig, message: str
) -> None:
    before = [m.name for m in served.models]
    with pytest.raises(ConfigError, match=message):
        await served.serving.add_model(config)
    assert [m.name for m in served.models] == before


async def test_removing_what_is_not_served_is_not_found(served: RouterServer) -> None:
    with pytest.raises(NotFound, match="'nope'"):
        await served.serving.remove_model("nope", grace_s=1)

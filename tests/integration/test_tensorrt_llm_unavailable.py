"""A TensorRT-LLM model on a host without TensorRT-LLM: the router starts, that model alone
reports the install step, and the other models serve."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN, make_config, running


@pytest.fixture(scope="module")
async def router(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("c"),
        ModelConfig(name="trt", kind="generate", artifact=GEN, backend="tensorrt_llm"),
        ModelConfig(name=EMB, kind="embed", artifact=EMB),
        retrieval=False,
    )
    async with running(config) as server:
        yield server


async def test_only_the_tensorrt_llm_model_fails_and_names_the_install_step(
    router: RouterServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        listed = {m.name: m.ready for m in (await stub.ListModels(pb.ListModelsRequest())).models}
        assert listed == {"trt": False, EMB: True}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Complete(pb.CompleteRequest(model="trt", prompt="hello"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "pip install tensorrt-llm" in (info.value.details() or "")
        embedded = await stub.Embed(pb.EmbedRequest(model=EMB, texts=["still serving"]))
        assert len(embedded.embeddings[0].values) == 384

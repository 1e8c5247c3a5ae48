"""KServe v2 gRPC served through the router: `backend: kserve_grpc` against KServe's own
ModelServer (tests/kserve_server.py, llama.cpp on the SmolLM2 GGUF), alone and as one replica of
a deployment beside an OpenAI-compatible llama.cpp server. The router renders the chat template
once; both protocols must give the same greedy text."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from backends.kserve.config import KServeConfig
from backends.openai.config import OpenAIHttpConfig
from router.config import ModelConfig
from router.models.prepare import smollm2_gguf_path
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.routing.config import DeploymentConfig, ReplicaConfig, RoutingConfig
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config
from tests.kserve_server import KServeServer, kserve_missing, running_kserve_server
from tests.openai_servers import OpenAIServer


@pytest.fixture(scope="module")
def kserve() -> Iterator[KServeServer]:
    reason = kserve_missing()
    if reason:
        pytest.skip(reason)
    with running_kserve_server(smollm2_gguf_path()) as server:
        yield server


def model(name: str, **fields: object) -> ModelConfig:
    return ModelConfig(
        name=name,
        kind="generate",
        artifact=GEN,  # tokenizer and chat template
        max_slots=2,
        max_context=1024,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
async def stub(
    kserve: KServeServer,
    llama: OpenAIServer,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    kserve_config = KServeConfig(url=kserve.target, model=kserve.model, read_timeout_s=120)
    http = OpenAIHttpConfig(url=llama.url, model=llama.model, dialect="llama.cpp")
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("c"),
        model("kserve", backend="kserve_grpc", kserve=kserve_config),
        model("http", backend="openai_http", remote=http),
        model("behind", backend="openai_http", remote=http),
        retrieval=False,
        routing=RoutingConfig(
            deployments=(
                DeploymentConfig(
                    name="mixed",
                    model="behind",
                    balancer="round_robin",
                    replicas=(
                        ReplicaConfig(
                            name="triton-like",
                            backend="kserve_grpc",
                            url=f"grpc://{kserve.target}",
                            remote_model=kserve.model,
                        ),
                        ReplicaConfig(name="llama", backend="openai_http", url=llama.url),
                    ),
                ),
            )
        ),
    )
    server = RouterServer(config)
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel)
    await server.stop(0)


def ask(model: str, text: str = "What is the capital of France?") -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=pb.SamplingParams(max_tokens=12, temperature=0.0),
        cache_mode=pb.CACHE_MODE_BYPASS,
    )


async def test_kserve_and_openai_http_give_the_same_greedy_text(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    via_kserve = await stub.Complete(ask("kserve"))
    via_http = await stub.Complete(ask("http"))
    assert via_kserve.text and via_kserve.text == via_http.text
    assert via_kserve.usage.completion_tokens > 0
    chunks = [
        c
        async for c in stub.Generate(
            pb.GenerateRequest(
                model="kserve",
                chat=ask("kserve").chat,
                sampling=pb.SamplingParams(max_tokens=12, temperature=0.0),
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
        )
    ]
    assert "".join(c.text for c in chunks) == via_kserve.text
    assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)


async def test_a_deployment_mixes_kserve_and_openai_replicas(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    answers = {(await stub.Complete(ask("mixed"))).text for _ in range(4)}
    assert len(answers) == 1 and answers != {""}
    listed = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    replicas = {r.name: r for r in listed["mixed"].replicas}
    assert replicas["triton-like"].backend == "kserve_grpc"
    assert replicas["triton-like"].healthy and replicas["llama"].healthy
    assert listed["mixed"].backend == "kserve_grpc,openai_http"


async def test_a_sampling_field_kserve_cannot_take_is_named(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    request = ask("kserve")
    request.sampling.min_p = 0.2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.min_p" in (caught.value.details() or "")

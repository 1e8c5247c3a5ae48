"""A remote OpenAI-compatible engine served through the router: llama-cpp-python's server on the
same SmolLM2 GGUF, called by `backend: openai_http`; the router renders the chat template,
streams the server's text, and maps the server's failures to named statuses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from backends.openai.config import OpenAIHttpConfig
from router.config import ModelConfig
from router.models.chat_template import render_chat
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config
from tests.openai_servers import OpenAIServer, free_port


def remote_model(name: str, url: str, model: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        kind="generate",
        artifact=GEN,  # the tokenizer and chat template
        backend="openai_http",
        max_slots=2,
        max_context=1024,
        remote=OpenAIHttpConfig(url=url, model=model, dialect="llama.cpp", read_timeout_s=120),
    )


@pytest.fixture(scope="module")
async def stub(
    llama: OpenAIServer, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("c"),
        remote_model("remote", llama.url, llama.model),
        remote_model("down", f"http://127.0.0.1:{free_port()}", "nothing"),
        retrieval=False,
    )
    server = RouterServer(config)
    await server.start()
    await server.wait_ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel)
    await server.stop(0)


def chat(text: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)])


async def test_generate_streams_the_remote_answer(
    stub: pb_grpc.InferenceServiceStub, llama: OpenAIServer, model_cache: Path
) -> None:
    question = "What is the capital of France?"
    request = pb.GenerateRequest(
        model="remote",
        chat=chat(question),
        sampling=pb.SamplingParams(max_tokens=12, temperature=0.0),
        cache_mode=pb.CACHE_MODE_BYPASS,
    )
    chunks = [c async for c in stub.Generate(request)]
    text = "".join(c.text for c in chunks)
    # What the server itself answers to the prompt the router rendered, asked directly.
    manifest = json.loads((model_cache / GEN / "manifest.json").read_text())
    prompt = render_chat(manifest["chat_template"], [{"role": "user", "content": question}])
    async with httpx.AsyncClient(timeout=120) as client:
        direct = await client.post(
            f"{llama.url}/v1/completions",
            json={
                "model": llama.model,
                "prompt": prompt,
                "max_tokens": 12,
                "temperature": 0,
                "top_k": 0,
                "min_p": 0,
                "repeat_penalty": 1,
            },
        )
    assert text and text == direct.json()["choices"][0]["text"]
    assert chunks[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert len(chunks) > 2  # streamed, not one blob
    # Same prompt, unary: the same greedy text.
    complete = await stub.Complete(
        pb.CompleteRequest(
            model="remote",
            chat=chat("What is the capital of France?"),
            sampling=pb.SamplingParams(max_tokens=12, temperature=0.0),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    assert complete.text == text


async def test_a_parameter_the_server_cannot_honour_is_named(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Complete(
            pb.CompleteRequest(
                model="remote",
                prompt="hi",
                sampling=pb.SamplingParams(max_tokens=4, stop_token_ids=[5]),
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop_token_ids" in (info.value.details() or "")


async def test_structured_outputs_and_tools_are_refused_naming_the_field(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    """Only the router's own step loop enforces them; a remote engine must not ignore them."""
    structured = pb.SamplingParams(
        max_tokens=8, structured_output=pb.StructuredOutput(json_object=True)
    )
    tools = {
        "tools": [pb.Tool(name="f")],
        "tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
    }
    for sampling, extra, field in (
        (structured, {}, "sampling.structured_output.json_object"),
        (pb.SamplingParams(max_tokens=32), tools, "tools"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Complete(
                pb.CompleteRequest(model="remote", chat=chat("hi"), sampling=sampling, **extra)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'remote' is served by a backend that cannot enforce" in (info.value.details() or "")
        status = rpc_status.from_call(info.value)
        assert status is not None
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert bad.field_violations[0].field == field


async def test_an_unreachable_server_is_unavailable_naming_it(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Complete(pb.CompleteRequest(model="down", prompt="hi"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "down" in (info.value.details() or "")


async def test_usage_counts_the_tokens_of_a_text_only_stream(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    # llama-cpp-python streams one event per token and reports no usage: the router counts.
    chunks = [
        c
        async for c in stub.Generate(
            pb.GenerateRequest(
                model="remote",
                prompt="Count from 1 to 100, separated by commas: 1, 2,",
                sampling=pb.SamplingParams(max_tokens=10, temperature=0.0),
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
        )
    ]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 10


async def test_a_cached_remote_answer_keeps_its_token_count(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    """A text-only stream has no token ids to count on a cache hit: the count is stored."""
    request = pb.CompleteRequest(
        model="remote",
        chat=chat("Name one colour."),
        sampling=pb.SamplingParams(max_tokens=5, temperature=0.0),
    )
    first = await stub.Complete(request)
    again = await stub.Complete(request)
    assert first.cache_status == pb.CACHE_STATUS_MISS
    assert again.cache_status == pb.CACHE_STATUS_EXACT_HIT and again.text == first.text
    assert again.usage.completion_tokens == first.usage.completion_tokens > 0
    streamed = [
        c
        async for c in stub.Generate(
            pb.GenerateRequest(model="remote", chat=request.chat, sampling=request.sampling)
        )
    ]
    assert streamed[-1].cache_status == pb.CACHE_STATUS_EXACT_HIT
    assert streamed[-1].usage.completion_tokens == first.usage.completion_tokens

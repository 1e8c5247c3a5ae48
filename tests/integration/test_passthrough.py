"""Models served with no local artifact (`backend: openai_http`, no `artifact`): conversations
go to the server's /v1/chat/completions as they are, prompts to /v1/completions, texts to
/v1/embeddings; tool calls, response formats and token counts are the server's.

Against a real server where one installs here (llama-cpp-python's, rendering SmolLM2's chat
template itself) and, for what it cannot show (tool-call deltas, usage events, error statuses),
against `tests/fake_openai.py`: contract tests on OpenAI's published wire format."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from backends.openai.config import OpenAIHttpConfig
from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.routing.config import (
    DeploymentConfig,
    HealthCheckConfig,
    ReplicaConfig,
    RoutingConfig,
)
from router.server import RouterServer
from tests.fake_openai import Answer, FakeOpenAI, chat_event, fake_openai, usage_event
from tests.integration.conftest import TEST_MODELS, make_config, running
from tests.integration.rest_proxy import serve_proxy
from tests.openai_servers import OpenAIServer


def passthrough(
    name: str, url: str, model: str, dialect: str, kind: str = "generate", **remote: Any
) -> ModelConfig:
    return ModelConfig(
        name=name,
        kind=kind,
        backend="openai_http",
        max_slots=4,
        max_context=1024,
        remote=OpenAIHttpConfig(
            url=url, model=model, dialect=dialect, read_timeout_s=120, **remote
        ),
    )


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with fake_openai() as server:
        yield server


@pytest.fixture(scope="module")
async def router(
    fake: FakeOpenAI,
    llama: OpenAIServer,
    model_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RouterServer]:
    """The router: the passthrough models and the packaged SmolLM2 (with artifact)."""
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("c"),
        TEST_MODELS[0],
        passthrough("up", fake.url, fake.model, "vllm"),
        passthrough("up-openai", fake.url, fake.model, "openai"),
        passthrough("up-embed", fake.url, fake.model, "openai", kind="embed"),
        passthrough("llama", llama.url, llama.model, "llama.cpp"),
        passthrough(
            "azure",
            f"{fake.url}/openai/deployments/gpt-4o",
            "gpt-4o",
            "azure",
            api_version="2024-10-21",
            api_key="azure-key",
        ),
        retrieval=False,
    )
    async with running(config) as server:
        yield server


@pytest.fixture(scope="module")
async def stub(router: RouterServer) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
async def sdk(router: RouterServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK through the OpenAI routes calling the router in process, as
    `serve --http-port` serves them (tests/integration/test_rest_openai.py holds both ways)."""
    async with (
        serve_proxy(f"127.0.0.1:{router.port}", router.local_handlers) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client,
    ):
        yield client


def chat(*turns: tuple[str, str]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns])


def last_body(fake: FakeOpenAI) -> dict[str, Any]:
    return fake.generations()[-1].body


async def test_a_conversation_goes_to_the_chat_route_as_it_is(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    turns = (("system", "Be brief."), ("user", "Hi there"))
    answer = await stub.Complete(
        pb.CompleteRequest(
            model="up",
            chat=chat(*turns),
            sampling=pb.SamplingParams(max_tokens=9, temperature=0.5, top_k=3),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    request = fake.generations()[-1]
    assert request.path == "/v1/chat/completions"
    body = request.body
    # A unary call fetches the answer whole: one JSON body, not an event per token.
    assert body["model"] == fake.model and body["stream"] is False
    assert "stream_options" not in body
    assert body["messages"] == [{"role": r, "content": c} for r, c in turns]
    assert (body["max_tokens"], body["temperature"], body["top_k"]) == (9, 0.5, 3)
    assert "prompt" not in body
    assert answer.text == "ok" and answer.finish_reason == pb.FINISH_REASON_STOP
    # The server's usage event settles the router's estimate.
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 1)
    assert answer.usage.source == pb.USAGE_SOURCE_SERVER


async def test_the_metrics_count_the_servers_tokens_not_the_estimate(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    def counted(name: str) -> float:
        value = router.metrics.registry.get_sample_value(f"{name}_total", {"model": "up"})
        return value or 0.0

    before = counted("irouter_prompt_tokens"), counted("irouter_completion_tokens")
    fake.script(Answer([chat_event("ok"), chat_event(finish="stop"), usage_event(321, 7)]))
    answer = await stub.Complete(
        pb.CompleteRequest(
            model="up", chat=chat(("user", "x" * 400)), cache_mode=pb.CACHE_MODE_BYPASS
        )
    )
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (321, 7)
    after = counted("irouter_prompt_tokens"), counted("irouter_completion_tokens")
    assert (after[0] - before[0], after[1] - before[1]) == (321, 7)


async def test_the_openai_dialect_gets_max_completion_tokens(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    await stub.Complete(
        pb.CompleteRequest(
            model="up-openai",
            chat=chat(("user", "Hi")),
            sampling=pb.SamplingParams(max_tokens=7),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    body = last_body(fake)
    assert body["max_completion_tokens"] == 7 and "max_tokens" not in body


async def test_azure_gets_its_deployment_url_api_version_and_key_header(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    await stub.Complete(
        pb.CompleteRequest(
            model="azure",
            chat=chat(("user", "Hi")),
            sampling=pb.SamplingParams(max_tokens=5),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    request = fake.generations()[-1]
    assert request.path == "/openai/deployments/gpt-4o/chat/completions"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == "azure-key" and "authorization" not in request.headers
    assert request.body["max_completion_tokens"] == 5


async def test_a_prompt_goes_to_the_completions_route_with_no_template(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    answer = await stub.Complete(
        pb.CompleteRequest(model="up", prompt="Once upon", cache_mode=pb.CACHE_MODE_BYPASS)
    )
    request = fake.generations()[-1]
    assert request.path == "/v1/completions" and request.body["prompt"] == "Once upon"
    assert answer.text == "ok"


async def test_the_servers_tool_calls_are_relayed(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "call_1", "type": "function"}
    events = [
        chat_event(tool_calls=[{**call, "function": {"name": "get_weather", "arguments": ""}}]),
        chat_event(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        chat_event(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
        chat_event(finish="tool_calls"),
        usage_event(40, 12),
    ]
    tool = pb.Tool(
        name="get_weather",
        description="Weather in a city",
        parameters='{"type": "object", "properties": {"city": {"type": "string"}}}',
    )
    request = pb.CompleteRequest(
        model="up",
        chat=chat(("user", "Weather in Paris?")),
        tools=[tool],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        cache_mode=pb.CACHE_MODE_BYPASS,
    )
    fake.script(Answer(events))
    answer = await stub.Complete(request)
    assert answer.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.id, c.name, c.arguments) for c in answer.tool_calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}')
    ]
    assert answer.usage.completion_tokens == 12
    body = last_body(fake)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": json.loads(tool.parameters),
            },
        }
    ]
    assert body["tool_choice"] == "required" and "parallel_tool_calls" not in body
    # Streamed: the deltas as the server sent them, then the finish reason.
    fake.script(Answer(events))
    chunks = [c async for c in stub.Generate(pb.GenerateRequest(**_fields(request)))]
    deltas = [d for c in chunks for d in c.tool_calls]
    assert (deltas[0].index, deltas[0].id, deltas[0].name) == (0, "call_1", "get_weather")
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris"}'
    assert chunks[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


def _fields(request: pb.CompleteRequest) -> dict[str, Any]:
    return {f.name: v for f, v in request.ListFields()}


async def test_tool_history_goes_in_the_apis_form(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    made = pb.ToolCall(id="call_9", name="add", arguments='{"a": 1, "b": 2}')
    messages = pb.ChatMessages(
        messages=[
            pb.ChatMessage(role="user", content="1+2?"),
            pb.ChatMessage(role="assistant", tool_calls=[made]),
            pb.ChatMessage(role="tool", content="3", tool_call_id="call_9"),
        ]
    )
    await stub.Complete(
        pb.CompleteRequest(
            model="up",
            chat=messages,
            tools=[pb.Tool(name="add")],
            tool_choice=pb.ToolChoice(function="add"),
            parallel_tool_calls=False,
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    body = last_body(fake)
    assert body["messages"] == [
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                }
            ],
        },
        {"role": "tool", "content": "3", "tool_call_id": "call_9"},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert body["parallel_tool_calls"] is False


async def test_structured_outputs_go_as_response_format_or_are_refused(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}}'

    def request(model: str, **structured: Any) -> pb.CompleteRequest:
        return pb.CompleteRequest(
            model=model,
            chat=chat(("user", "A number")),
            sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(**structured)),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )

    await stub.Complete(request("up-openai", json_schema=schema))
    assert last_body(fake)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": json.loads(schema), "strict": True},
    }
    await stub.Complete(request("up", regex="[0-9]+"))  # vLLM's own structured_outputs
    assert last_body(fake)["structured_outputs"] == {"regex": "[0-9]+"}
    sent = len(fake.generations())
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Complete(request("up-openai", regex="[0-9]+"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_output.regex cannot be enforced by the remote 'openai' server" in (
        e.value.details() or ""
    )
    assert len(fake.generations()) == sent  # refused before anything was sent


async def test_an_upstream_refusal_names_the_upstream_and_its_message(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    fake.script(Answer(status=400, error={"message": "messages[0] is too long"}))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Complete(pb.CompleteRequest(model="up", chat=chat(("user", "Hi"))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details() or ""
    assert f"{fake.url}/v1/chat/completions" in details
    assert "HTTP 400" in details and "messages[0] is too long" in details


async def test_a_truncated_stream_ends_with_an_error_not_a_short_answer(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    fake.script(Answer([chat_event("Hel"), chat_event("lo")], done=False))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in stub.Generate(
            pb.GenerateRequest(
                model="up", chat=chat(("user", "Hi")), cache_mode=pb.CACHE_MODE_BYPASS
            )
        ):
            pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the stream ended without a finish_reason" in (e.value.details() or "")


async def test_the_servers_content_filter_is_the_finish_reason(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    fake.script(Answer([chat_event("I can"), chat_event(finish="content_filter")]))
    answer = await stub.Complete(
        pb.CompleteRequest(model="up", chat=chat(("user", "Hi")), cache_mode=pb.CACHE_MODE_BYPASS)
    )
    assert answer.finish_reason == pb.FINISH_REASON_CONTENT_FILTER
    assert answer.text == "I can"


async def test_without_a_usage_event_the_usage_is_an_estimate(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    events = [chat_event("a"), chat_event("bcdef"), chat_event(finish="stop")]
    request = pb.GenerateRequest(
        model="up", chat=chat(("user", "x" * 40)), cache_mode=pb.CACHE_MODE_BYPASS
    )
    fake.script(Answer(events))
    usage = [c async for c in stub.Generate(request)][-1].usage
    assert usage.source == pb.USAGE_SOURCE_ESTIMATE
    # ceil(40 bytes / 4) + 4 for the message; one token per streamed event.
    assert (usage.prompt_tokens, usage.completion_tokens) == (14, 2)
    fake.script(Answer(events))
    usage = (await stub.Complete(pb.CompleteRequest(**_fields(request)))).usage
    assert usage.source == pb.USAGE_SOURCE_ESTIMATE
    # Fetched whole: ceil(6 bytes / 4) for the completion.
    assert (usage.prompt_tokens, usage.completion_tokens) == (14, 2)


async def test_embeddings_go_to_the_embeddings_route(
    stub: pb_grpc.InferenceServiceStub, fake: FakeOpenAI
) -> None:
    answer = await stub.Embed(pb.EmbedRequest(model="up-embed", texts=["abc", "defgh"]))
    assert [e.values[0] for e in answer.embeddings] == [3.0, 5.0]
    assert fake.requests[-1].path == "/v1/embeddings"
    assert fake.requests[-1].body["input"] == ["abc", "defgh"]
    # The server's count (3 a text, in the fake) settles the estimate reserved for.
    assert answer.usage.source == pb.USAGE_SOURCE_SERVER and answer.usage.prompt_tokens == 6
    # One text from the embedding cache (its estimate), one counted: an estimate in all.
    answer = await stub.Embed(pb.EmbedRequest(model="up-embed", texts=["abc", "not cached yet"]))
    assert answer.usage.source == pb.USAGE_SOURCE_ESTIMATE and answer.usage.prompt_tokens == 1 + 3
    fake.embedding_usage = False  # a server that counts nothing: the documented estimate
    try:
        answer = await stub.Embed(pb.EmbedRequest(model="up-embed", texts=["nor is this one"]))
    finally:
        fake.embedding_usage = True
    assert answer.usage.source == pb.USAGE_SOURCE_ESTIMATE and answer.usage.prompt_tokens == 4


async def test_llama_cpp_renders_the_conversation_with_its_own_template(
    stub: pb_grpc.InferenceServiceStub, llama: OpenAIServer
) -> None:
    question = "What is the capital of France?"
    answer = await stub.Complete(
        pb.CompleteRequest(
            model="llama",
            chat=chat(("user", question)),
            sampling=pb.SamplingParams(max_tokens=12, temperature=0.0),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    async with httpx.AsyncClient(timeout=120) as client:
        direct = await client.post(
            f"{llama.url}/v1/chat/completions",
            json={
                "model": llama.model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 12,
                "temperature": 0.0,
                "top_k": 0,
                "min_p": 0.0,
                "repeat_penalty": 1.0,
            },
        )
    direct.raise_for_status()
    assert answer.text == direct.json()["choices"][0]["message"]["content"]
    assert answer.text  # the model said something
    # Fetched whole, with the server's usage (llama-cpp-python streams none).
    assert answer.usage.source == pb.USAGE_SOURCE_SERVER


async def test_a_config_without_artifact_needs_the_openai_http_backend(
    model_cache: Path, tmp_path: Path
) -> None:
    from router.config import ConfigError

    model = ModelConfig(name="local", kind="generate")
    with pytest.raises(ConfigError, match=r"models\['local'\]\.artifact is empty: backend"):
        make_config(model_cache, tmp_path, model, retrieval=False)


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def test_the_sdk_gets_the_servers_tool_calls_for_an_image_question(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    call = {"index": 0, "id": "call_7", "type": "function"}
    events = [
        chat_event(tool_calls=[{**call, "function": {"name": "get_weather", "arguments": ""}}]),
        chat_event(tool_calls=[{"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}]),
        chat_event(finish="tool_calls"),
        usage_event(120, 9),
    ]
    content = [{"type": "text", "text": "Where is this? Weather there?"}, IMAGE]
    fake.script(Answer(events))
    answer = await sdk.chat.completions.create(
        model="up",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="auto",
    )
    # The image and the tools reached the server as the client sent them.
    body = last_body(fake)
    assert body["messages"] == [{"role": "user", "content": content}]
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "auto"
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [made] = choice.message.tool_calls
    assert (made.id, made.function.name, made.function.arguments) == (
        "call_7",
        "get_weather",
        '{"city": "Oslo"}',
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == 120
    assert (answer.usage.model_extra or {}).get("source") == "server"
    # Streamed, as the SDK assembles the deltas.
    fake.script(Answer(events))
    stream = await sdk.chat.completions.create(
        model="up",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        stream=True,
        stream_options={"include_usage": True},
    )
    arguments, finish = "", None
    async for chunk in stream:
        for choice_chunk in chunk.choices:
            for delta in choice_chunk.delta.tool_calls or ():
                arguments += delta.function.arguments or "" if delta.function else ""
            finish = choice_chunk.finish_reason or finish
    assert (arguments, finish) == ('{"city": "Oslo"}', "tool_calls")


async def test_an_upstream_4xx_keeps_its_status_through_the_proxy(
    sdk: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.script(Answer(status=404, error={"message": "The model `x` does not exist"}))
    with pytest.raises(openai.NotFoundError) as e:
        await sdk.chat.completions.create(
            model="up", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
    assert e.value.status_code == 404
    assert f"{fake.url}/v1/chat/completions: HTTP 404" in e.value.message
    assert "does not exist" in e.value.message


async def test_an_image_for_a_model_with_an_artifact_is_refused_by_name(
    sdk: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(
            model=TEST_MODELS[0].name,
            messages=[{"role": "user", "content": [IMAGE]}],  # type: ignore[list-item]
        )
    assert "takes text only" in e.value.message
    assert e.value.param == "messages[0].content"


async def test_a_deployment_of_passthrough_replicas_retries_before_the_first_token(
    model_cache: Path, tmp_path: Path
) -> None:
    async with fake_openai() as bad, fake_openai() as good:
        warm_up = Answer([chat_event("ok"), chat_event(finish="stop")])
        bad.script(warm_up, *[Answer(status=503, error={"message": "overloaded"})] * 8)
        routing = RoutingConfig(
            deployments=(
                DeploymentConfig(
                    name="dep",
                    model="remote",
                    balancer="round_robin",
                    replicas=tuple(
                        ReplicaConfig(
                            name=f"r{i}", backend="openai_http", url=s.url, remote_model=s.model
                        )
                        for i, s in enumerate((bad, good))
                    ),
                    health_check=HealthCheckConfig(interval_s=0),
                ),
            )
        )
        remote = OpenAIHttpConfig(dialect="vllm", read_timeout_s=30)
        model = ModelConfig(name="remote", kind="generate", backend="openai_http", remote=remote)
        config = make_config(model_cache, tmp_path, model, retrieval=False, routing=routing)
        async with (
            running(config) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = pb_grpc.InferenceServiceStub(channel)
            bad.requests.clear()  # the warm-up's
            good.requests.clear()
            for _ in range(4):
                answer = await stub.Complete(
                    pb.CompleteRequest(
                        model="dep", chat=chat(("user", "Hi")), cache_mode=pb.CACHE_MODE_BYPASS
                    )
                )
                assert answer.text == "ok" and answer.usage.source == pb.USAGE_SOURCE_SERVER
    assert len(bad.generations()) >= 1  # round robin sent some to the failing replica...
    assert len(good.generations()) == 4  # ...whose calls were retried on the other
    assert all(r.body["messages"] == [{"role": "user", "content": "Hi"}] for r in bad.generations())


@pytest.mark.parametrize(
    "structured",
    [
        {"json_object": True},
        {"json_schema": '{"type": "object", "properties": {"capital": {"type": "string"}}, '
                        '"required": ["capital"], "additionalProperties": false}'},
    ],
)  # fmt: skip
async def test_llama_cpp_enforces_a_response_format_itself(
    stub: pb_grpc.InferenceServiceStub, structured: dict[str, Any]
) -> None:
    answer = await stub.Complete(
        pb.CompleteRequest(
            model="llama",
            chat=chat(("user", "What is the capital of France? Answer in JSON.")),
            sampling=pb.SamplingParams(
                max_tokens=48,
                temperature=0.0,
                structured_output=pb.StructuredOutput(**structured),
            ),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
    )
    assert answer.finish_reason == pb.FINISH_REASON_STOP, answer.text
    value = json.loads(answer.text)
    assert isinstance(value, dict)
    if "json_schema" in structured:
        assert set(value) == {"capital"} and isinstance(value["capital"], str)

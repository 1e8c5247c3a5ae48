"""The OpenAI chat wire layer without a server (backends/openai/chat.py): the body of a
streamed /chat/completions call per server kind, and the reading of its events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backends.base import (
    ChatRequest,
    GenerationRequest,
    StructuredOutput,
    ToolCallDelta,
    UnsupportedParameter,
)
from backends.openai.chat import chat_body, parse_chat_event
from backends.remote import RemoteHTTPError, RemoteProtocolError

URL = "http://10.0.0.7:8000/v1/chat/completions"
MESSAGES = ({"role": "user", "content": "Hi"},)


def make_request(**fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "request_id": "r1",
        "prompt_ids": (),
        "prompt": "",
        "max_tokens": 16,
        "chat": ChatRequest(MESSAGES),
    }
    values.update(fields)
    return GenerationRequest(**values)


def test_the_conversation_and_sampling_are_sent_as_they_are() -> None:
    body = chat_body(make_request(temperature=0.2, seed=5), model="m", dialect="vllm")
    assert body["messages"] == list(MESSAGES) and body["model"] == "m"
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (16, 0.2, 5)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "tools" not in body and "tool_choice" not in body and "prompt" not in body


def test_openai_takes_max_completion_tokens_and_llama_cpp_its_defaults() -> None:
    body = chat_body(make_request(), model="m", dialect="openai")
    assert body["max_completion_tokens"] == 16 and "max_tokens" not in body
    body = chat_body(make_request(), model="m", dialect="llama.cpp")
    assert (body["top_k"], body["min_p"], body["repeat_penalty"]) == (0, 0.0, 1.0)
    assert "stream_options" not in body


def test_tools_and_choice_are_sent_when_given() -> None:
    tools = ({"type": "function", "function": {"name": "f", "parameters": {}}},)
    chat = ChatRequest(MESSAGES, tools=tools, tool_choice="required", parallel_tool_calls=False)
    body = chat_body(make_request(chat=chat), model="m", dialect="openai")
    assert body["tools"] == list(tools)
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("required", False)


@pytest.mark.parametrize(
    ("dialect", "spec", "key", "value"),
    [
        ("openai", StructuredOutput("json_object"), "response_format", {"type": "json_object"}),
        ("openai", StructuredOutput("json_schema", '{"type": "integer"}'), "response_format",
         {"type": "json_schema",
          "json_schema": {"name": "output", "schema": {"type": "integer"}, "strict": True}}),
        ("llama.cpp", StructuredOutput("json_schema", '{"type": "integer"}'), "response_format",
         {"type": "json_object", "schema": {"type": "integer"}}),
        ("vllm", StructuredOutput("regex", "a+"), "structured_outputs", {"regex": "a+"}),
    ],
)  # fmt: skip
def test_structured_outputs_by_dialect(
    dialect: str, spec: StructuredOutput, key: str, value: dict[str, Any]
) -> None:
    assert chat_body(make_request(structured=spec), model="m", dialect=dialect)[key] == value


def test_what_a_dialect_cannot_honour_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedParameter, match=r"structured_output\.grammar cannot be") as e:
        chat_body(
            make_request(structured=StructuredOutput("grammar", "start: 'a'")),
            model="m",
            dialect="vllm",
        )
    assert e.value.field == "structured_output.grammar"
    with pytest.raises(UnsupportedParameter) as e:
        chat_body(make_request(min_p=0.1), model="m", dialect="openai")
    assert e.value.field == "min_p"


def test_content_tool_calls_finish_and_usage_are_read() -> None:
    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    assert parse_chat_event(URL, event({"role": "assistant", "content": "Hi"}), emitted=False)[
        :2
    ] == ("Hi", None)
    call = {"index": 1, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
    got = parse_chat_event(URL, event({"tool_calls": [call]}), emitted=False)
    assert got.tool_calls == (ToolCallDelta(1, "c", "f", "{"),)
    assert parse_chat_event(URL, event({}, "function_call"), emitted=True).finish_reason == (
        "tool_calls"
    )
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert parse_chat_event(URL, usage, emitted=True).usage == (3, 2)


@pytest.mark.parametrize(
    "data",
    [
        '{"choices": [{"delta": {"content": 5}}]}',
        '{"choices": [{"delta": {"tool_calls": [{"index": -1}]}}]}',
        '{"choices": [{"delta": {"tool_calls": [{"function": {}}]}}]}',
        '{"choices": [{"delta": {}, "finish_reason": "exploded"}]}',
    ],
)
def test_malformed_chat_events_name_the_url(data: str) -> None:
    with pytest.raises(RemoteProtocolError, match=rf"^{URL}: "):
        parse_chat_event(URL, data, emitted=False)


def test_an_error_event_is_the_servers_error() -> None:
    data = json.dumps({"error": {"message": "overloaded", "code": 503}})
    with pytest.raises(RemoteHTTPError, match="overloaded") as e:
        parse_chat_event(URL, data, emitted=False)
    assert e.value.status == 503 and e.value.retryable


def test_azure_needs_an_api_version_and_sends_its_key_as_api_key() -> None:
    from backends.openai.config import OpenAIHttpConfig

    url = "https://r.openai.azure.com/openai/deployments/d"
    with pytest.raises(ValueError, match="api_version is missing"):
        OpenAIHttpConfig(url=url, model="d", dialect="azure").validate()
    with pytest.raises(ValueError, match="api_version applies to dialect 'azure' only"):
        OpenAIHttpConfig(url=url, model="d", api_version="2024-10-21").validate()
    cfg = OpenAIHttpConfig(
        url=url, model="d", dialect="azure", api_version="2024-10-21", api_key="k"
    ).validate()
    assert cfg.endpoint("/chat/completions") == f"{url}/chat/completions?api-version=2024-10-21"
    assert cfg.headers() == {"api-key": "k"}
    assert OpenAIHttpConfig(url=url, model="d", api_key="k").headers() == {
        "Authorization": "Bearer k"
    }


def test_a_whole_answer_is_read_with_its_tool_calls_and_usage() -> None:
    from backends.openai.wire import parse_answer

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    data = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
    }
    got = parse_answer(URL, json.dumps(data).encode(), chat=True)
    assert got == ("", "tool_calls", (7, 5), (ToolCallDelta(0, "c1", "f", '{"a": 1}'),))
    text = {"choices": [{"index": 0, "text": "Hi", "finish_reason": "length"}]}
    assert parse_answer(URL, json.dumps(text).encode(), chat=False) == ("Hi", "length", None, ())
    for bad in (b"{", b'{"choices": []}', b'{"choices": [{"text": "x", "finish_reason": "?"}]}'):
        with pytest.raises(RemoteProtocolError, match=rf"^{URL}: ") as e:
            parse_answer(URL, bad, chat=False)
        assert e.value.retryable

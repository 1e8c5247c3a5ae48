"""The OpenAI wire layer without a server: request bodies per server kind, streamed events,
SSE framing and the remote engine's configuration."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backends.base import GenerationRequest, StructuredOutput, UnsupportedParameter
from backends.openai.config import OpenAIHttpConfig
from backends.openai.engine import OpenAIHttpEngine
from backends.openai.sse import SSEDecoder
from backends.openai.wire import completion_body, http_error, parse_event
from backends.remote import RemoteHTTPError, RemoteProtocolError

URL = "http://10.0.0.7:8000/v1/completions"


def make_request(**fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "request_id": "r1",
        "prompt_ids": (1, 2, 3),
        "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "max_tokens": 16,
    }
    values.update(fields)
    return GenerationRequest(**values)


def body(dialect: str, **fields: Any) -> dict[str, Any]:
    return completion_body(make_request(**fields), model="m", dialect=dialect)


def test_every_kind_gets_the_openai_fields_and_the_rendered_prompt() -> None:
    for dialect in ("openai", "vllm", "trtllm", "llama.cpp", "ovms"):
        b = body(dialect, temperature=0.0, top_p=0.5, seed=7)
        assert b["prompt"] == make_request().prompt
        assert b["stream"] is True
        assert (b["max_tokens"], b["temperature"], b["top_p"], b["seed"]) == (16, 0.0, 0.5, 7)


def test_neutral_fields_are_not_sent() -> None:
    b = body("vllm")
    for name in ("stop", "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos"):
        assert name not in b


def test_llama_cpp_gets_neutral_defaults_and_its_own_penalty_name() -> None:
    # llama-cpp-python defaults to top_k=40, min_p=0.05, repeat_penalty=1.1: not what we mean.
    assert {k: body("llama.cpp")[k] for k in ("top_k", "min_p", "repeat_penalty")} == {
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }
    b = body("llama.cpp", top_k=5, min_p=0.1, repetition_penalty=1.3, stop=("\n",))
    assert (b["top_k"], b["min_p"], b["repeat_penalty"], b["stop"]) == (5, 0.1, 1.3, ["\n"])
    assert "repetition_penalty" not in b and "stream_options" not in b


def test_vllm_gets_its_extras_and_asks_for_usage() -> None:
    b = body("vllm", top_k=5, min_p=0.1, stop_token_ids=(2,), ignore_eos=True)
    assert (b["top_k"], b["min_p"], b["stop_token_ids"], b["ignore_eos"]) == (5, 0.1, [2], True)
    assert b["stream_options"] == {"include_usage": True}


def test_token_id_prompts_for_vllm() -> None:
    b = completion_body(make_request(), model="m", dialect="vllm", prompt_format="token_ids")
    assert b["prompt"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("dialect", "fields", "refused"),
    [
        ("openai", {"top_k": 5}, "top_k"),
        ("openai", {"min_p": 0.1, "ignore_eos": True}, "min_p, ignore_eos"),
        ("llama.cpp", {"stop_token_ids": (2,)}, "stop_token_ids"),
        ("llama.cpp", {"ignore_eos": True}, "ignore_eos"),
        ("ovms", {"min_p": 0.2}, "min_p"),
    ],
)
def test_fields_the_server_would_ignore_are_refused_by_name(
    dialect: str, fields: dict[str, Any], refused: str
) -> None:
    with pytest.raises(
        UnsupportedParameter, match=rf"^{refused} cannot be honoured.*{dialect}"
    ) as e:
        body(dialect, **fields)
    assert e.value.field == refused.split(",")[0]


def test_ovms_leaves_stop_strings_to_the_router() -> None:
    assert "stop" not in body("ovms", stop=("\n",))
    engine = OpenAIHttpEngine(OpenAIHttpConfig(url="http://h:1", model="m", dialect="ovms"))
    assert not engine.capabilities.stop_strings
    assert engine.config.endpoint("/completions") == "http://h:1/v3/completions"


def test_parse_event_reads_text_finish_and_usage() -> None:
    chunk = {"choices": [{"index": 0, "text": "Hel", "finish_reason": None}]}
    assert parse_event(URL, json.dumps(chunk), emitted=False) == ("Hel", None, None, ())
    last = {"choices": [{"text": "", "finish_reason": "length"}], "usage": None}
    assert parse_event(URL, json.dumps(last), emitted=True) == ("", "length", None, ())
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
    assert parse_event(URL, json.dumps(usage), emitted=True) == ("", None, (9, 4), ())


@pytest.mark.parametrize(
    "data", ["{not json", "[1, 2]", '{"id": "x"}', '{"choices": [{"text": 5}]}']
)
def test_malformed_events_name_the_url_and_the_data(data: str) -> None:
    with pytest.raises(
        RemoteProtocolError, match=r"^http://10\.0\.0\.7:8000/v1/completions: "
    ) as e:
        parse_event(URL, data, emitted=False)
    assert data[:5] in str(e.value) and e.value.retryable
    with pytest.raises(RemoteProtocolError) as e:
        parse_event(URL, data, emitted=True)
    assert not e.value.retryable


def test_unknown_finish_reason_is_an_error() -> None:
    with pytest.raises(RemoteProtocolError, match="finish_reason='abort'"):
        parse_event(URL, '{"choices": [{"text": "", "finish_reason": "abort"}]}', emitted=True)


def test_error_event_mid_stream() -> None:
    with pytest.raises(RemoteHTTPError, match="out of memory") as e:
        parse_event(URL, '{"error": {"message": "out of memory", "code": 503}}', emitted=True)
    assert e.value.status == 503 and not e.value.retryable


def test_http_errors_carry_the_server_message_and_retryability() -> None:
    e = http_error(URL, 400, "Bad Request", '{"error": {"message": "prompt too long"}}')
    assert str(e) == f"{URL}: HTTP 400 Bad Request: prompt too long"
    assert e.status == 400 and not e.retryable
    assert http_error(URL, 503, "Service Unavailable", "busy").retryable


def test_sse_decoder_frames_events() -> None:
    decoder = SSEDecoder()
    lines = [": ping", "event: completion", 'data: {"a":', "data:1}", "", "", "data: [DONE]"]
    out = [decoder.feed(line) for line in lines]
    assert [d for d in out if d is not None] == ['{"a":\n1}']
    assert decoder.flush() == "[DONE]"  # not terminated by a blank line
    assert decoder.flush() is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "10.0.0.7:8000"}, "url='10.0.0.7:8000' must start with http://"),
        ({"url": ""}, "url is missing: set it to the server root"),
        ({"model": ""}, "model is missing: set it to the model's name at http://10.0.0.7:8000"),
        ({"dialect": "tgi"}, "dialect='tgi' is unknown; accepted: openai, azure, vllm"),
        ({"prompt_format": "token_ids"}, "not accepted by a 'openai' server"),
        ({"read_timeout_s": 0}, "read_timeout_s=0 must be positive"),
        ({"max_connections": 0}, "max_connections=0 must be at least 1"),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"url": "http://10.0.0.7:8000", "model": "m", **fields}
    with pytest.raises(ValueError, match=message):
        OpenAIHttpConfig(**values).validate().require_endpoint()


def test_endpoint_joins_root_and_prefix() -> None:
    cfg = OpenAIHttpConfig(url="http://h:8000/", model="m")
    assert cfg.endpoint("/models") == "http://h:8000/v1/models"
    assert OpenAIHttpConfig(url="http://h", model="m", api_prefix="").endpoint("/x") == "http://h/x"


@pytest.mark.parametrize(
    ("kind", "text", "sent"),
    [
        ("json_schema", '{"type": "object"}', {"json": {"type": "object"}}),
        ("json_object", "", {"json_object": True}),
        ("regex", "[0-9]+", {"regex": "[0-9]+"}),
    ],
)
def test_vllm_enforces_structured_outputs_itself(kind: str, text: str, sent: Any) -> None:
    """vLLM >= 0.10.2's published `structured_outputs` field (docs.vllm.ai, Structured
    Outputs); a contract test, no vLLM here."""
    b = body("vllm", structured=StructuredOutput(kind, text))
    assert b["structured_outputs"] == sent


@pytest.mark.parametrize(
    ("dialect", "kind"),
    [
        ("vllm", "grammar"),  # vLLM's grammar dialect depends on its backend: not Lark
        ("openai", "json_schema"),  # /completions has no structured-output field
        ("trtllm", "json_object"),
        ("llama.cpp", "regex"),
        ("ovms", "json_schema"),
    ],
)
def test_other_servers_refuse_structured_outputs_by_name(dialect: str, kind: str) -> None:
    with pytest.raises(UnsupportedParameter, match="cannot be enforced") as e:
        body(dialect, structured=StructuredOutput(kind, "x"))
    assert e.value.field == f"structured_output.{kind}"


def test_only_dialects_that_enforce_structured_outputs_say_so() -> None:
    def engine(dialect: str) -> OpenAIHttpEngine:
        return OpenAIHttpEngine(OpenAIHttpConfig(url="http://x", model="m", dialect=dialect))

    assert engine("vllm").capabilities.structured_output
    assert not engine("llama.cpp").capabilities.structured_output

"""What goes over the wire to an OpenAI-compatible server, as pure functions: which
sampling fields each kind of server honours (`DIALECTS`), the JSON body of a streamed
/completions call, and the reading of one streamed event.

Servers differ in what they honour beyond the OpenAI API. A request that sets a field the
target would silently ignore is refused by name (UnsupportedParameter) before anything is sent,
so a prompt samples the same way whichever backend serves it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from backends.base import (
    GenerationRequest,
    StructuredOutput,
    ToolCallDelta,
    UnsupportedParameter,
)
from backends.remote import (
    FINISH_REASONS,
    RemoteHTTPError,
    RemoteProtocolError,
)

RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
"""HTTP statuses after which the same request may go to another replica."""
PROMPT_FORMATS = ("text", "token_ids")


NEUTRAL: Mapping[str, Any] = MappingProxyType(
    {
        "stop": (),
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "stop_token_ids": (),
        "ignore_eos": False,
    }
)
"""Optional GenerationRequest fields and the value that leaves sampling unchanged: a field at
its neutral value is not sent, and needs no support from the server."""
_OPENAI = frozenset({"stop", "presence_penalty", "frequency_penalty"})
_VLLM = _OPENAI | {"top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos"}


@dataclass(frozen=True)
class Dialect:
    """What one kind of server accepts beyond max_tokens, temperature, top_p and seed (which
    every kind receives)."""

    api_prefix: str
    """Path before /completions, /embeddings and /models."""
    honoured: frozenset[str]
    """Optional sampling fields (NEUTRAL's keys) it applies as the router does."""
    wire_names: Mapping[str, str] = field(default_factory=dict)
    """JSON key of a field when it differs from the field's name."""
    always: Mapping[str, Any] = field(default_factory=dict)
    """Sent with every request: neutral values where the server's own defaults are not."""
    usage_in_stream: bool = True
    """Accepts stream_options.include_usage (token counts in a last event)."""
    token_id_prompts: bool = False
    """Accepts the prompt as a list of token ids."""
    router_stops: bool = False
    """Stop strings are left to the router (capabilities.stop_strings=False), not sent."""
    structured: frozenset[str] = frozenset()
    """StructuredOutput kinds the server enforces itself (sent as vLLM's `structured_outputs`);
    any other kind is refused by name."""
    response_formats: frozenset[str] = frozenset({"json_schema", "json_object"})
    """StructuredOutput kinds a chat call sends as OpenAI's `response_format` (models with no
    local artifact); `structured` kinds beyond them go as `structured_outputs`."""
    schema_in_json_object: bool = False
    """A JSON schema goes as {"type": "json_object", "schema": ...} (llama.cpp's servers; both
    take it, llama-cpp-python no other form) instead of OpenAI's json_schema."""
    max_tokens_key: str = "max_tokens"
    """The chat body's key for max_tokens (OpenAI's API: max_completion_tokens)."""
    key_header: str = "Authorization"
    """The header that carries api_key (as 'Bearer <key>' in Authorization, else the key)."""
    lists_models: bool = True
    """GET <prefix>/models lists the served models (ready() looks for `model` there)."""
    api_version: bool = False
    """Every URL carries ?api-version=<OpenAIHttpConfig.api_version> (Azure OpenAI)."""


DIALECTS: Mapping[str, Dialect] = MappingProxyType(
    {
        "openai": Dialect("/v1", _OPENAI, max_tokens_key="max_completion_tokens"),
        # Azure OpenAI: url is a deployment's (https://R.openai.azure.com/openai/deployments/D),
        # which names the model (the body's `model` is ignored there); `api-key` header; no
        # per-deployment model list, so readiness is judged by calls (breakers), not a probe.
        "azure": Dialect(
            "",
            _OPENAI,
            max_tokens_key="max_completion_tokens",
            key_header="api-key",
            lists_models=False,
            api_version=True,
        ),
        # vLLM >= 0.10.2 (`structured_outputs`; the older `guided_*` fields went in 0.12). Its
        # `grammar` is read by whichever backend vLLM picks (GBNF for xgrammar), not Lark.
        "vllm": Dialect(
            "/v1",
            _VLLM,
            token_id_prompts=True,
            structured=frozenset({"json_schema", "json_object", "regex"}),
        ),
        "trtllm": Dialect("/v1", _VLLM, token_id_prompts=True),
        # llama-cpp-python's server and llama.cpp's llama-server. Their defaults (top_k 40,
        # min_p 0.05, repeat_penalty 1.1) are not neutral, so every request carries ours;
        # llama-cpp-python sends no usage event.
        "llama.cpp": Dialect(
            "/v1",
            _OPENAI | {"top_k", "min_p", "repetition_penalty"},
            wire_names={"repetition_penalty": "repeat_penalty"},
            always={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
            usage_in_stream=False,
            schema_in_json_object=True,
        ),
        # OpenVINO Model Server streams a matched stop string (include_stop_str_in_output must
        # be true when streaming), so the router cuts the text itself.
        "ovms": Dialect(
            "/v3",
            (_OPENAI - {"stop"}) | {"top_k", "repetition_penalty", "ignore_eos"},
            router_stops=True,
        ),
    }
)
"""Server kinds, by the name OpenAIHttpConfig.dialect takes."""


def refuse_unhonoured(request: GenerationRequest, model: str, dialect: str) -> None:
    """Raise UnsupportedParameter (its field: the first one) naming every field set to a
    non-neutral value that a `dialect` server would ignore."""
    kind = DIALECTS[dialect]
    refused = [
        name
        for name, neutral in NEUTRAL.items()
        if name not in kind.honoured
        and getattr(request, name) != neutral
        and not (kind.router_stops and name == "stop")
    ]
    if refused:
        raise UnsupportedParameter(
            refused[0],
            f"{', '.join(refused)} cannot be honoured by the remote {dialect!r} server of "
            f"model {model!r}; leave {'it' if len(refused) == 1 else 'them'} unset",
        )


def sampling_fields(request: GenerationRequest, dialect: str) -> dict[str, Any]:
    """The optional sampling fields a `dialect` server honours, where not neutral, with its
    always-sent values (checked first by refuse_unhonoured)."""
    kind = DIALECTS[dialect]
    out: dict[str, Any] = dict(kind.always)
    for name, neutral in NEUTRAL.items():
        value = getattr(request, name)
        if name in kind.honoured and value != neutral:
            out[kind.wire_names.get(name, name)] = (
                list(value) if isinstance(value, tuple) else value
            )
    return out


def completion_body(
    request: GenerationRequest, *, model: str, dialect: str, prompt_format: str = "text"
) -> dict[str, Any]:
    """The JSON body of a streamed /completions call for `request` to a `dialect` server.

    Raises UnsupportedParameter (its field: the first one) naming every field set to a
    non-neutral value that the server would ignore.
    """
    kind = DIALECTS[dialect]
    refuse_unhonoured(request, model, dialect)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt_ids) if prompt_format == "token_ids" else request.prompt,
        "stream": True,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
    }
    if kind.usage_in_stream:
        body["stream_options"] = {"include_usage": True}
    spec = request.structured
    if spec is not None:
        if spec.kind not in kind.structured:
            raise UnsupportedParameter(
                f"structured_output.{spec.kind}",
                f"structured_output.{spec.kind} cannot be enforced by the remote {dialect!r} "
                f"server of model {model!r}"
                + (f" (it takes {', '.join(sorted(kind.structured))})" if kind.structured else ""),
            )
        body["structured_outputs"] = structured_outputs(spec)
    body.update(sampling_fields(request, dialect))
    return body


def structured_outputs(spec: StructuredOutput) -> dict[str, Any]:
    """vLLM's StructuredOutputsParams for `spec`."""
    if spec.kind == "json_schema":
        return {"json": json.loads(spec.text)}
    if spec.kind == "json_object":
        return {"json_object": True}
    return {"regex": spec.text}


class CompletionEvent(NamedTuple):
    """What one streamed event adds."""

    text: str
    finish_reason: str | None
    usage: tuple[int | None, int | None] | None
    """(prompt tokens, completion tokens) when the event reports usage."""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    """Chat events: pieces of the tool calls the server parsed."""


def load_event(url: str, data: str | bytes, *, emitted: bool) -> dict[str, Any]:
    """One SSE event's JSON object. Raises RemoteHTTPError for an error event, and ValueError
    or TypeError for one that is not a JSON object (the callers' RemoteProtocolError)."""
    event = orjson.loads(data)
    if not isinstance(event, dict):
        raise TypeError(f"a JSON {type(event).__name__}, not an object")
    if "error" in event or event.get("object") == "error":
        error = event.get("error", event)
        message = error.get("message", error) if isinstance(error, dict) else error
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and code >= 400 else 500
        raise RemoteHTTPError(
            url,
            f"error event mid-stream: {message}",
            status=status,
            retryable=not emitted and status in RETRYABLE_STATUS,
        )
    return event


def usage_counts(event: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """(prompt tokens, completion tokens) when the event reports usage."""
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return None
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


def first_choice(
    url: str, data: str, *, emitted: bool
) -> tuple[dict[str, Any] | None, tuple[int | None, int | None] | None]:
    """(the event's first choice, or None for a usage event; its usage counts). Raises what
    load_event raises, and KeyError/IndexError/TypeError for an event without choices."""
    event = load_event(url, data, emitted=emitted)
    choices = event["choices"]
    return (choices[0] if choices else None), usage_counts(event)


def parse_event(url: str, data: str, *, emitted: bool) -> CompletionEvent:
    """Read the data of one /completions SSE event (not '[DONE]').

    Raises RemoteHTTPError for an error event and RemoteProtocolError for anything that is not
    a completion chunk; `emitted` (text was already passed on) makes neither retryable.
    """
    try:
        choice, counts = first_choice(url, data, emitted=emitted)
        if choice is None:  # the usage event
            return CompletionEvent("", None, counts)
        text = choice.get("text") or ""
        if not isinstance(text, str):
            raise TypeError(f"choices[0].text is a {type(text).__name__}")
        reason = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise RemoteProtocolError(
            url, f"malformed completion event {data[:200]!r} ({exc})", retryable=not emitted
        ) from None
    if reason is not None and reason not in FINISH_REASONS:
        raise RemoteProtocolError(
            url, f"finish_reason={reason!r} is not 'stop' or 'length'", retryable=False
        )
    return CompletionEvent(text, reason, counts)


CHAT_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the API's older name, still sent by some servers
    "content_filter": "content_filter",
}
"""A chat choice's finish_reason → the engine's (a completion's are only stop and length)."""


def parse_answer(url: str, data: bytes, *, chat: bool) -> CompletionEvent:
    """Read a non-streamed /completions or /chat/completions answer: its text (a chat's
    message content), tool calls (whole, as one piece each), finish reason and usage. Raises
    RemoteProtocolError for anything else (retryable: nothing was passed on)."""
    try:
        answer = load_event(url, data, emitted=False)
        choice = answer["choices"][0]
        calls: tuple[ToolCallDelta, ...] = ()
        if chat:
            message = choice["message"]
            text = message.get("content") or ""
            calls = tuple(
                ToolCallDelta(
                    i, c.get("id") or "", c["function"]["name"], c["function"]["arguments"]
                )
                for i, c in enumerate(message.get("tool_calls") or ())
            )
        else:
            text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        if not isinstance(text, str) or not isinstance(reason, str):
            raise TypeError("text and finish_reason must be strings")
        for call in calls:
            if not (isinstance(call.name, str) and isinstance(call.arguments, str)):
                raise TypeError("tool_calls[].function name and arguments must be strings")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise RemoteProtocolError(
            url, f"malformed answer {data[:200]!r} ({exc})", retryable=True
        ) from None
    known = CHAT_FINISH_REASONS.get(reason) if chat else reason
    if known is None or known not in CHAT_FINISH_REASONS:
        raise RemoteProtocolError(url, f"finish_reason={reason!r} is not known", retryable=True)
    return CompletionEvent(text, known, usage_counts(answer), calls)


def http_error(url: str, status: int, reason: str, body: str) -> RemoteHTTPError:
    """The error for an HTTP status >= 400, with the server's own message when it sent one."""
    detail = body[:300]
    try:
        payload = json.loads(body)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(error, dict):
            detail = str(error.get("message") or error.get("detail") or error)
    except ValueError:
        pass
    detail = " ".join(detail.split())[:300]  # one line, however the server formats it
    return RemoteHTTPError(
        url,
        f"HTTP {status} {reason}: {detail}",
        status=status,
        retryable=status in RETRYABLE_STATUS,
    )

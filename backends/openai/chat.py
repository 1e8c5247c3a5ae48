"""The OpenAI chat API on the wire, for models served with no local artifact: the server renders
the conversation with its own chat template and parses tool calls with its own parser. The body
of a streamed /chat/completions call, and the reading of one streamed event, as pure functions.

What differs by server kind (sampling fields, usage in the stream, the max_tokens key) is the
`Dialect` of wire.py, shared with /completions; a field the server would ignore is refused by
name before anything is sent.
"""

from __future__ import annotations

import json
from typing import Any

from backends.base import GenerationRequest, StructuredOutput, ToolCallDelta, UnsupportedParameter
from backends.openai.wire import (
    CHAT_FINISH_REASONS,
    DIALECTS,
    CompletionEvent,
    first_choice,
    refuse_unhonoured,
    sampling_fields,
    structured_outputs,
)
from backends.remote import RemoteProtocolError


def chat_body(request: GenerationRequest, *, model: str, dialect: str) -> dict[str, Any]:
    """The JSON body of a streamed /chat/completions call for `request` (its `chat` set).

    Raises UnsupportedParameter naming a field the server would ignore, or a structured output
    kind it cannot enforce.
    """
    chat = request.chat
    assert chat is not None
    kind = DIALECTS[dialect]
    refuse_unhonoured(request, model, dialect)
    body: dict[str, Any] = {
        "model": model,
        "messages": list(chat.messages),
        "stream": True,
        kind.max_tokens_key: request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
    }
    if kind.usage_in_stream:
        body["stream_options"] = {"include_usage": True}
    if chat.tools:
        body["tools"] = list(chat.tools)
    if chat.tool_choice is not None:
        body["tool_choice"] = chat.tool_choice
    if chat.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = chat.parallel_tool_calls
    spec = request.structured
    if spec is not None:
        if spec.kind in kind.response_formats:
            body["response_format"] = response_format(spec, kind.schema_in_json_object)
        elif spec.kind in kind.structured:
            body["structured_outputs"] = structured_outputs(spec)
        else:
            takes = sorted(kind.response_formats | kind.structured)
            raise UnsupportedParameter(
                f"structured_output.{spec.kind}",
                f"structured_output.{spec.kind} cannot be enforced by the remote {dialect!r} "
                f"server of model {model!r} (it takes {', '.join(takes)})",
            )
    body.update(sampling_fields(request, dialect))
    return body


def response_format(spec: StructuredOutput, schema_in_json_object: bool = False) -> dict[str, Any]:
    """OpenAI's response_format for a json_schema or json_object spec (a schema inside
    json_object for llama.cpp's servers)."""
    if spec.kind == "json_object":
        return {"type": "json_object"}
    if schema_in_json_object:
        return {"type": "json_object", "schema": json.loads(spec.text)}
    return {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": json.loads(spec.text), "strict": True},
    }


def parse_chat_event(url: str, data: str, *, emitted: bool) -> CompletionEvent:
    """Read the data of one /chat/completions SSE event (not '[DONE]'): its content, tool-call
    pieces, finish reason and usage.

    Raises RemoteHTTPError for an error event and RemoteProtocolError for anything that is not
    a chat completion chunk; `emitted` (output was already passed on) makes neither retryable.
    """
    try:
        choice, counts = first_choice(url, data, emitted=emitted)
        if choice is None:  # the usage event
            return CompletionEvent("", None, counts)
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        if not isinstance(text, str):
            raise TypeError(f"choices[0].delta.content is a {type(text).__name__}")
        calls = tuple(_tool_call(c) for c in delta.get("tool_calls") or ())
        reason = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise RemoteProtocolError(
            url, f"malformed chat completion event {data[:200]!r} ({exc})", retryable=not emitted
        ) from None
    if reason is not None:
        known = CHAT_FINISH_REASONS.get(reason)
        if known is None:
            raise RemoteProtocolError(
                url,
                f"finish_reason={reason!r} is not one of {', '.join(CHAT_FINISH_REASONS)}",
                retryable=False,
            )
        reason = known
    return CompletionEvent(text, reason, counts, calls)


def _tool_call(piece: dict[str, Any]) -> ToolCallDelta:
    """One entry of delta.tool_calls."""
    function = piece.get("function") or {}
    index, call_id = piece["index"], piece.get("id") or ""
    name, arguments = function.get("name") or "", function.get("arguments") or ""
    if not isinstance(index, int) or index < 0:
        raise TypeError(f"tool_calls[].index={index!r} is not a non-negative integer")
    for key, value in (("id", call_id), ("function.name", name), ("function.arguments", arguments)):
        if not isinstance(value, str):
            raise TypeError(f"tool_calls[].{key} is a {type(value).__name__}")
    return ToolCallDelta(index, call_id, name, arguments)

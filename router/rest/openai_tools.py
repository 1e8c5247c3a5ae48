"""OpenAI's function calling on the chat route: `tools`, `tool_choice` and `parallel_tool_calls`
into the router's Tool fields, assistant `tool_calls` and `tool` turns into the conversation, and
the router's tool calls back into `message.tool_calls` and streamed `delta.tool_calls` as the
official SDKs read them."""

from __future__ import annotations

import json
from typing import Any

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.rest.errors import bad_request, refuse_unknown, type_error

Body = dict[str, Any]
_TOOL_FIELDS = frozenset({"type", "function"})
_FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})
_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


def _tool(raw: object, where: str) -> pb.Tool:
    if not isinstance(raw, dict) or raw.get("type") != "function":
        raise type_error(where, "an object with type 'function'", raw)
    refuse_unknown(where, raw, _TOOL_FIELDS)
    function = raw.get("function")
    if not isinstance(function, dict):
        raise type_error(f"{where}.function", "an object with a 'name'", function)
    refuse_unknown(f"{where}.function", function, _FUNCTION_FIELDS)
    name = function.get("name")
    if not isinstance(name, str):
        raise type_error(f"{where}.function.name", "a string", name)
    description = function.get("description", "")
    if not isinstance(description, str):
        raise type_error(f"{where}.function.description", "a string", description)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise type_error(f"{where}.function.parameters", "a JSON Schema object", parameters)
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise type_error(f"{where}.function.strict", "a boolean", strict)
    # Arguments are enforced to the schema whether or not `strict` is set.
    return pb.Tool(
        name=name,
        description=description,
        parameters=json.dumps(parameters) if parameters is not None else "",
    )


def tool_fields(body: Body) -> dict[str, Any]:
    """tools, tool_choice and parallel_tool_calls as GenerateRequest/CompleteRequest fields."""
    out: dict[str, Any] = {}
    raw = body.get("tools")
    if raw is not None:
        if not isinstance(raw, list):
            raise type_error("tools", "a list of tools", raw)
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(raw)]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        if choice not in _MODES:
            raise bad_request(
                f"'tool_choice'={json.dumps(choice)} is not one of auto, none, required, or a "
                "function",
                param="tool_choice",
                code="invalid_value",
            )
        out["tool_choice"] = pb.ToolChoice(mode=_MODES[choice])
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict):
            raise type_error(
                "tool_choice", "{'type': 'function', 'function': {'name': ...}}", choice
            )
        name = function.get("name")
        if not isinstance(name, str):
            raise type_error("tool_choice.function.name", "a string", name)
        out["tool_choice"] = pb.ToolChoice(function=name)
    elif choice is not None:
        raise type_error("tool_choice", "a string or an object", choice)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise type_error("parallel_tool_calls", "a boolean", parallel)
        out["parallel_tool_calls"] = parallel
    return out


def history_calls(message: Body, where: str) -> list[pb.ToolCall]:
    """An assistant turn's `tool_calls`."""
    raw = message.get("tool_calls")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise type_error(f"{where}.tool_calls", "a list of tool calls", raw)
    calls = []
    for j, call in enumerate(raw):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(function, dict):
            raise type_error(at, "an object with 'id' and 'function'", call)
        call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
        if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
            raise type_error(at, "{'id', 'function': {'name', 'arguments'}} of strings", call)
        calls.append(pb.ToolCall(id=call_id, name=name, arguments=arguments))
    return calls


def message_calls(calls: Any) -> list[dict[str, Any]]:
    """A CompleteResponse's calls as `message.tool_calls`."""
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def delta_calls(deltas: Any) -> list[dict[str, Any]]:
    """A GenerateResponse's call deltas as `delta.tool_calls`: the first of each call with its
    id, type and name, the later ones with arguments only."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if d.id:
            out.append(
                {
                    "index": d.index,
                    "id": d.id,
                    "type": "function",
                    "function": {"name": d.name, "arguments": d.arguments},
                }
            )
        elif out and out[-1]["index"] == d.index:
            out[-1]["function"]["arguments"] += d.arguments
        else:
            out.append({"index": d.index, "function": {"arguments": d.arguments}})
    return out

"""Tools and tool-call history into the conversation a model sees: through its chat template
when the template takes `tools` (Hugging Face's convention), else in the documented format
(router/tools/__init__.py) with plain system, user and assistant turns."""

from __future__ import annotations

import json
from typing import Any

from router.errors import InvalidArgument
from router.tools.grammar import call_text
from router.tools.spec import Tools

Message = dict[str, str]
"""role, content, and for tool history "tool_calls" (JSON text of [{id, name, arguments}]) on
assistant turns, "tool_call_id" on tool turns."""

SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

{rule}
For each function call, write one line with a JSON object with the function name and its \
arguments within <tool_call></tool_call> XML tags:
<tool_call>{{"name": <function-name>, "arguments": <args-json-object>}}</tool_call>"""

RULES = {
    "auto": "Call functions only when they help; otherwise answer in plain text.",
    "required": "You must call at least one function.",
}


def has_tool_history(messages: list[Message]) -> bool:
    """Whether a turn carries tool calls or a tool's result (which need rendering)."""
    return any("tool_calls" in m or "tool_call_id" in m for m in messages)


def takes_tools(template: str) -> bool:
    """Whether a chat template renders a `tools` variable itself."""
    return "tools" in template


def signatures(tools: Tools) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.schema()},
        }
        for t in tools.offered
    ]


def _rule(tools: Tools) -> str:
    if tools.choice == "function":
        return f"You must call the function {tools.function}."
    rule = RULES[tools.choice]
    return rule if tools.parallel else rule + " Make at most one call."


def check_history(messages: list[Message]) -> dict[str, str]:
    """Every tool turn answers an earlier call by its id; InvalidArgument naming the turn."""
    names: dict[str, str] = {}
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            call_id = m.get("tool_call_id", "")
            if call_id not in names:
                raise InvalidArgument(
                    f"chat.messages[{i}] is a tool result for call {call_id!r}, which no earlier "
                    "assistant turn made",
                    field=f"chat.messages[{i}].tool_call_id",
                )
        for call in json.loads(m.get("tool_calls") or "[]"):
            names[call["id"]] = call["name"]
    return names


def plain(messages: list[Message], tools: Tools | None) -> list[Message]:
    """The documented format: the tools in a system turn, earlier calls and their results as
    text (for templates that know nothing of tools)."""
    names = check_history(messages)
    out: list[Message] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if m.get("tool_calls"):
            lines = [
                call_text(c["name"], json.loads(c["arguments"]))
                for c in json.loads(m["tool_calls"])
            ]
            content = "\n".join([content, *lines] if content else lines)
        elif role == "tool":
            role = "user"
            result = {"tool_call_id": m["tool_call_id"], "name": names[m["tool_call_id"]]}
            content = f"<tool_response>{json.dumps({**result, 'content': content})}</tool_response>"
        out.append({"role": role, "content": content})
    if tools is not None and tools.offered:
        listed = "\n".join(json.dumps(s) for s in signatures(tools))
        system = SYSTEM.format(tools=listed, rule=_rule(tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def structured_history(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as tool-aware templates take them (Hugging Face's convention)."""
    names = check_history(messages)
    out: list[dict[str, Any]] = []
    for m in messages:
        turn: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            turn["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.loads(c["arguments"])},
                }
                for c in json.loads(m["tool_calls"])
            ]
        if m["role"] == "tool":
            turn["tool_call_id"] = m["tool_call_id"]
            turn["name"] = names[m["tool_call_id"]]
        out.append(turn)
    return out


def template_tools(tools: Tools | None) -> list[dict[str, Any]] | None:
    """The `tools` variable for a tool-aware template (None: no tools offered)."""
    if tools is None or not tools.offered:
        return None
    return signatures(tools)

"""The tool choice as a structured output: a Lark grammar (llguidance's dialect) whose calls are
the documented `<tool_call>{"name": ..., "arguments": ...}</tool_call>` lines, each one's
arguments valid for its tool's parameters."""

from __future__ import annotations

import functools
import json
from typing import Any

from backends.base import StructuredOutput
from router.structured.grammar import COMPACT, STRICT
from router.tools.spec import Tool, Tools

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it (and as earlier calls are shown to it)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}{body}{CLOSE}"


def _call_schema(tools: tuple[Tool, ...]) -> dict[str, Any]:
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.schema()},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": {**COMPACT, **STRICT}}


@functools.lru_cache(maxsize=256)
def structured(tools: Tools) -> StructuredOutput | None:
    """What the output may be under `tools.choice`: text or calls (auto), calls (required), a
    call of one function; None when the model is not offered tools. Cached: the same tools come
    with every call of an agent (building the grammar of 10 tools takes ~0.2 ms)."""
    offered = tools.offered
    if not offered:
        return None
    if tools.choice == "function":
        offered = tuple(t for t in offered if t.name == tools.function)
    # A named function is one call (as OpenAI's tool_choice {"function": ...} makes).
    several = tools.parallel and tools.choice != "function"
    calls = 'call ("\\n" call)*' if several else "call"
    lines = [
        f"calls: {calls}",
        f'call: "{OPEN}" body "{CLOSE}"',
        f"body: %json {json.dumps(_call_schema(offered))}",
    ]
    if tools.choice == "auto":
        # Text that does not open a call: with both open, the first bytes decide.
        lines += ["start: TEXT | calls", f"TEXT: /(?s:.+)/ & ~/{OPEN}(?s:.*)/"]
    else:
        lines.insert(0, "start: calls")
    return StructuredOutput("grammar", "\n".join(lines) + "\n")


def shortest_call(tools: Tools) -> str:
    """The shortest call the grammar admits when a call is required (empty arguments), to check
    that max_tokens can hold one."""
    names = [tools.function] if tools.choice == "function" else [t.name for t in tools.tools]
    return call_text(min(names, key=len), {})

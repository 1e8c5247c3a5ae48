"""Tools, the tool choice and tool-call history as the router takes them, each checked so that a
bad one is refused naming its field."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

from backends.base import ToolCallDelta as ToolCallDelta  # one type for engines and router
from router.errors import InvalidArgument
from router.structured.grammar import STRICT

MAX_TOOLS = 128
MAX_DESCRIPTION_CHARS = 4096
MAX_PARAMETERS_BYTES = 32 * 1024
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
CHOICES = ("auto", "none", "required", "function")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""
    """JSON Schema of the arguments (JSON text of an object); empty: any JSON object."""

    def schema(self) -> dict[str, Any]:
        return json.loads(self.parameters) if self.parameters else {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: its id, the function and its arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Tools:
    """What a call offers the model."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    """One of CHOICES; "function": `function` must be called."""
    function: str = ""
    parallel: bool = True
    """Several calls in one answer (OpenAI's parallel_tool_calls, on by default)."""

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the model is shown (none with choice "none")."""
        return () if self.choice == "none" else self.tools


def checked(tools: Tools) -> Tools:
    """`tools`, or InvalidArgument naming the first bad field."""
    if len(tools.tools) > MAX_TOOLS:
        raise InvalidArgument(
            f"tools has {len(tools.tools)} entries; at most {MAX_TOOLS} are allowed",
            field="tools",
        )
    seen: set[str] = set()
    for i, tool in enumerate(tools.tools):
        where = f"tools[{i}]"
        if not NAME.fullmatch(tool.name):
            raise InvalidArgument(
                f"{where}.name={tool.name[:80]!r} is not a function name: letters, digits, '_' "
                "and '-', 1 to 64 characters, not starting with a digit or '-'",
                field=f"{where}.name",
            )
        if tool.name in seen:
            raise InvalidArgument(
                f"{where}.name={tool.name!r} is used by an earlier tool; names must be unique",
                field=f"{where}.name",
            )
        seen.add(tool.name)
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(
                f"{where}.description has {len(tool.description)} characters; at most "
                f"{MAX_DESCRIPTION_CHARS} are allowed",
                field=f"{where}.description",
            )
        _check_parameters(tool, where)
    if tools.choice not in CHOICES:
        raise InvalidArgument(
            f"tool_choice={tools.choice!r} is not one of {', '.join(CHOICES)}",
            field="tool_choice",
        )
    if not tools.tools and tools.choice in ("required", "function"):
        raise InvalidArgument(
            f"tool_choice asks for a call ({tools.choice}) but no tools are given",
            field="tool_choice",
        )
    if tools.choice == "function" and tools.function not in seen:
        raise InvalidArgument(
            f"tool_choice names function {tools.function!r}, which is not among the tools "
            f"({', '.join(sorted(seen))})",
            field="tool_choice.function",
        )
    return tools


def _check_parameters(tool: Tool, where: str) -> None:
    field = f"{where}.parameters"
    if len(tool.parameters.encode()) > MAX_PARAMETERS_BYTES:
        raise InvalidArgument(f"{field} has more than {MAX_PARAMETERS_BYTES} bytes", field=field)
    if tool.parameters:
        problem = _parameters_problem(tool.parameters)
        if problem:
            raise InvalidArgument(f"{field} {problem}", field=field)


@functools.lru_cache(maxsize=1024)
def _parameters_problem(parameters: str) -> str:
    """What is wrong with a tool's parameters schema ("" when nothing), cached by its text: an
    agent sends the same tools with every call, and llguidance's check takes ~0.3 ms per tool
    (3 ms for 10 tools, on the event loop)."""
    try:
        schema = json.loads(parameters)
    except ValueError as exc:
        return f"is not valid JSON: {exc}"
    if not isinstance(schema, dict):
        return f"must be a JSON Schema object, got {type(schema).__name__}"
    kind = schema.get("type", "object")
    if kind != "object":
        return f"must describe an object (type 'object'), got type {kind!r}"
    # Compiled for real with the call's grammar; checked here so that an error names the tool.
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema, overrides=STRICT))
    return f"is not usable: {error}" if error else ""

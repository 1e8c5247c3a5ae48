"""Tools checked, and the tool choice as a grammar that llguidance compiles against SmolLM2's
tokenizer: only well-formed calls of the offered tools, arguments valid for their schemas."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from llguidance import LLMatcher
from tokenizers import Tokenizer

from router.errors import InvalidArgument
from router.structured.compiler import GrammarCompiler
from router.tools import grammar, spec
from router.tools.spec import Tool, Tools

GEN = "smollm2-135m-instruct"
WEATHER = json.dumps(
    {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
)
TOOLS = (Tool("get_weather", "Weather", WEATHER), Tool("ping"))


@pytest.fixture(scope="module")
def tokenizer(prepared_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(prepared_models[GEN] / "tokenizer.json"))


def matcher(tokenizer: Tokenizer, tools: Tools) -> LLMatcher:
    structured = grammar.structured(tools)
    assert structured is not None
    compiler = GrammarCompiler(GEN, tokenizer, tokenizer.get_vocab_size(), [0, 2])
    return asyncio.run(compiler.compile(structured)).new_matcher()


def accepts(tokenizer: Tokenizer, tools: Tools, text: str) -> bool:
    m = matcher(tokenizer, tools)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return m.consume_tokens(ids) and m.is_accepting()


WEATHER_CALL = grammar.call_text("get_weather", {"city": "Oslo"})
PING_CALL = grammar.call_text("ping", {})


@pytest.mark.parametrize(
    ("choice", "function", "parallel", "text", "ok"),
    [
        ("required", "", True, WEATHER_CALL, True),
        ("required", "", True, WEATHER_CALL + "\n" + PING_CALL, True),
        ("required", "", False, WEATHER_CALL + "\n" + PING_CALL, False),
        ("required", "", True, "Oslo is sunny.", False),
        ("required", "", True, grammar.call_text("get_weather", {"town": "Oslo"}), False),
        ("required", "", True, grammar.call_text("nope", {}), False),
        ("function", "ping", True, PING_CALL, True),
        ("function", "ping", True, WEATHER_CALL, False),
        ("function", "ping", True, PING_CALL + "\n" + PING_CALL, False),
        ("auto", "", True, "Oslo is sunny.", True),
        ("auto", "", True, WEATHER_CALL, True),
        ("auto", "", True, "<tool_call>Oslo", False),
    ],
)
def test_the_grammar_admits_exactly_the_calls_the_choice_allows(
    tokenizer: Tokenizer, choice: str, function: str, parallel: bool, text: str, ok: bool
) -> None:
    tools = Tools(TOOLS, choice, function, parallel)
    assert accepts(tokenizer, tools, text) is ok


def test_no_tools_offered_means_no_grammar() -> None:
    assert grammar.structured(Tools(TOOLS, "none")) is None
    assert Tools(TOOLS, "none").offered == ()


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        (Tools((Tool("a"), Tool("a"))), "tools[1].name"),
        (Tools((Tool("-a"),)), "tools[0].name"),
        (Tools((Tool("x" * 65),)), "tools[0].name"),
        (Tools((Tool("a", "d" * 5000),)), "tools[0].description"),
        (Tools((Tool("a", parameters='{"type": "array"}'),)), "tools[0].parameters"),
        (Tools((Tool("a", parameters='{"type": "object", "if": {}}'),)), "tools[0].parameters"),
        (Tools((Tool("a"),), "function", "b"), "tool_choice.function"),
        (Tools((), "required"), "tool_choice"),
        (Tools((Tool("a"),), "sometimes"), "tool_choice"),
        (Tools(tuple(Tool(f"t{i}") for i in range(spec.MAX_TOOLS + 1))), "tools"),
    ],
)
def test_bad_tools_are_refused_naming_the_field(tools: Tools, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        spec.checked(tools)
    assert caught.value.field == field

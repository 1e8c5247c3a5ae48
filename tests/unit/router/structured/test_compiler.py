"""Specs compiled against SmolLM2's real tokenizer: errors named by field, a cache by spec, one
compile for concurrent calls, and a time limit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from backends.base import StructuredOutput
from router.errors import InvalidArgument
from router.structured.compiler import GrammarCompiler

GEN = "smollm2-135m-instruct"
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
)


@pytest.fixture(scope="module")
def tokenizer(prepared_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(prepared_models[GEN] / "tokenizer.json"))


def compiler(tokenizer: Tokenizer, **kwargs: float) -> GrammarCompiler:
    return GrammarCompiler(GEN, tokenizer, tokenizer.get_vocab_size(), [0, 2], **kwargs)  # type: ignore[arg-type]


async def test_a_spec_compiles_once_and_is_then_served_from_the_cache(
    tokenizer: Tokenizer,
) -> None:
    grammars = compiler(tokenizer)
    spec = StructuredOutput("json_schema", SCHEMA)
    first, second = await asyncio.gather(grammars.compile(spec), grammars.compile(spec))
    assert first is second  # concurrent calls share one compile
    assert await grammars.compile(StructuredOutput("json_schema", SCHEMA)) is first
    matcher = first.new_matcher()
    ids = tokenizer.encode('{"a": 12, "b": "y"}', add_special_tokens=False).ids
    assert matcher.consume_tokens(ids) and matcher.is_accepting()
    assert first.new_matcher() is not matcher  # each request has its own state


async def test_the_cache_keeps_the_most_recently_used_specs(tokenizer: Tokenizer) -> None:
    grammars = GrammarCompiler(GEN, tokenizer, tokenizer.get_vocab_size(), [0, 2], entries=2)
    specs = [StructuredOutput("regex", f"[0-9]{{{n}}}") for n in (1, 2, 3)]
    compiled = [await grammars.compile(s) for s in specs[:2]]
    await grammars.compile(specs[0])  # now the most recent
    await grammars.compile(specs[2])  # evicts specs[1]
    assert await grammars.compile(specs[0]) is compiled[0]
    assert await grammars.compile(specs[1]) is not compiled[1]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutput("json_schema", '{"type": "array", "contains": {}}'), "contains"),
        (StructuredOutput("json_schema", '{"type": "objekt"}'), "Invalid type: objekt"),
        (StructuredOutput("json_schema", '{"$ref": "#/defs/x"}'), "does not exist"),
        (StructuredOutput("regex", "a(b"), "unclosed group"),
        (StructuredOutput("grammar", "start: foo"), 'unknown name: "foo"'),
    ],
)
async def test_specs_that_do_not_compile_are_refused_naming_the_field(
    tokenizer: Tokenizer, spec: StructuredOutput, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        await compiler(tokenizer).compile(spec)
    assert caught.value.field == f"sampling.structured_output.{spec.kind}"


async def test_a_compile_past_the_time_limit_is_refused_and_the_loop_keeps_running(
    tokenizer: Tokenizer,
) -> None:
    grammars = compiler(tokenizer, timeout_s=1e-3)  # the tokenizer view's build is not timed
    pattern = {"type": "string", "pattern": "^[a-z]{1,40}[0-9]{3,9}$"}
    big = {"type": "object", "properties": {f"p{i}": pattern for i in range(400)}}  # ~40 ms
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(InvalidArgument, match=r"did not compile within 0.001 s") as caught:
            await grammars.compile(StructuredOutput("json_schema", json.dumps(big)))
    finally:
        ticker.cancel()
    assert caught.value.field == "sampling.structured_output.json_schema"
    assert ticks > 0

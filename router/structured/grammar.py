"""A StructuredOutput as llguidance grammar text, after checking what the client sent: its kind,
its size, and (JSON schemas) that it is a JSON object. What only compiling can tell (a keyword
llguidance does not implement, a regex or grammar that does not parse) compiler.py reports."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from llguidance import LLMatcher

from backends.base import STRUCTURED_KINDS, StructuredOutput
from router.errors import InvalidArgument

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of its stub only

FIELD = "sampling.structured_output"
"""Where the option sits in a GenerateRequest (errors name `FIELD.<kind>`)."""

MAX_SPEC_BYTES = 64 * 1024
"""A schema, regex or grammar larger than this is refused before it is parsed or compiled."""

STRICT: JsonCompileOptions = {"lenient": False}
"""Keywords llguidance does not implement are refused, never ignored."""

COMPACT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""One space after each separator and no other whitespace (a schema's "x-guidance" may ask for
more): free whitespace lets a sampled model pad an answer with newlines until max_tokens."""


def field(spec: StructuredOutput) -> str:
    return f"{FIELD}.{spec.kind}"


def to_grammar(spec: StructuredOutput) -> str:
    """llguidance's grammar text for `spec`; InvalidArgument naming the field when the input is
    wrong in a way visible before compiling."""
    if spec.kind not in STRUCTURED_KINDS:
        raise InvalidArgument(
            f"{FIELD} kind {spec.kind!r} is not one of {', '.join(STRUCTURED_KINDS)}", field=FIELD
        )
    where = field(spec)
    size = len(spec.text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument(
            f"{where} has {size} bytes; at most {MAX_SPEC_BYTES} are allowed", field=where
        )
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults=COMPACT, overrides=STRICT
        )
    if not spec.text:
        raise InvalidArgument(f"{where} is empty", field=where)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "grammar":
        return LLMatcher.grammar_from_lark(spec.text)
    try:
        schema = json.loads(spec.text)
    except ValueError as exc:
        raise InvalidArgument(f"{where} is not valid JSON: {exc}", field=where) from None
    if not isinstance(schema, dict):
        raise InvalidArgument(
            f"{where} must be a JSON object (a schema), got {type(schema).__name__}", field=where
        )
    return LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT, overrides=STRICT)

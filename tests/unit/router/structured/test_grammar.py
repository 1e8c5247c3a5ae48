"""What the client sent, checked before anything compiles: kind, size, JSON that is a schema."""

from __future__ import annotations

import json

import pytest

from backends.base import StructuredOutput
from router.errors import InvalidArgument
from router.structured.grammar import MAX_SPEC_BYTES, to_grammar


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (StructuredOutput("xml", "x"), "sampling.structured_output", "kind 'xml' is not one of"),
        (StructuredOutput("regex", ""), "sampling.structured_output.regex", "is empty"),
        (StructuredOutput("grammar", ""), "sampling.structured_output.grammar", "is empty"),
        (
            StructuredOutput("json_schema", "{nope"),
            "sampling.structured_output.json_schema",
            "is not valid JSON",
        ),
        (
            StructuredOutput("json_schema", "[1, 2]"),
            "sampling.structured_output.json_schema",
            "must be a JSON object \\(a schema\\), got list",
        ),
        (
            StructuredOutput("regex", "a" * (MAX_SPEC_BYTES + 1)),
            "sampling.structured_output.regex",
            f"has {MAX_SPEC_BYTES + 1} bytes; at most {MAX_SPEC_BYTES}",
        ),
    ],
)
def test_bad_specs_are_refused_naming_the_field(
    spec: StructuredOutput, field: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        to_grammar(spec)
    assert caught.value.field == field


def test_json_grammars_refuse_unimplemented_keywords_and_keep_json_compact() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    grammar = json.loads(to_grammar(StructuredOutput("json_schema", json.dumps(schema))))
    options = grammar["grammars"][0]["json_schema"]["x-guidance"]
    assert options["lenient"] is False
    assert options["whitespace_flexible"] is False
    assert (options["item_separator"], options["key_separator"]) == (", ", ": ")


def test_a_schema_may_ask_for_flexible_whitespace_but_not_for_leniency() -> None:
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": True, "lenient": True}}
    grammar = json.loads(to_grammar(StructuredOutput("json_schema", json.dumps(schema))))
    options = grammar["grammars"][0]["json_schema"]["x-guidance"]
    assert options["whitespace_flexible"] is True
    assert options["lenient"] is False

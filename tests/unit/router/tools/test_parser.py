"""The streamed output of a call with tools split into text and call deltas, however the text
is cut into pieces."""

from __future__ import annotations

import json

import pytest

from router.tools.grammar import call_text
from router.tools.parser import ToolCallParser
from router.tools.spec import ToolCallDelta

ARGS = {"city": 'Pa"}ris {[', "n": [1, {"a": "\\"}], "e": "é"}
TWO = call_text("get_weather", ARGS) + "\n" + call_text("f", {})


def run(text: str, step: int) -> tuple[str, list[ToolCallDelta], ToolCallParser]:
    parser = ToolCallParser()
    out, deltas = [], []
    for i in range(0, len(text), step):
        piece, got = parser.feed(text[i : i + step])
        out.append(piece)
        deltas += got
    out.append(parser.finish())
    return "".join(out), deltas, parser


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_calls_come_out_whole_and_as_deltas_whatever_the_pieces(step: int) -> None:
    text, deltas, parser = run(TWO, step)
    assert text == "" and parser.called
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
        ("get_weather", ARGS),
        ("f", {}),
    ]
    firsts = [d for d in deltas if d.id]
    assert [(d.index, d.name) for d in firsts] == [(0, "get_weather"), (1, "f")]
    assert [d.id for d in firsts] == [c.id for c in parser.calls]
    for index, call in enumerate(parser.calls):
        assert "".join(d.arguments for d in deltas if d.index == index) == call.arguments


@pytest.mark.parametrize("text", ["Plain answer.", "<b>bold</b>", "<tool", "<tool_cal>x", ""])
@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_text_that_does_not_open_a_call_passes_through(text: str, step: int) -> None:
    got, deltas, parser = run(text, step)
    assert got == text and deltas == [] and not parser.called


def test_text_is_held_back_only_while_it_may_open_a_call() -> None:
    parser = ToolCallParser()
    assert parser.feed("<tool_") == ("", [])
    assert parser.feed("x") == ("<tool_x", [])
    assert parser.feed(" more") == (" more", [])


def test_output_off_the_grammar_is_an_error_not_a_wrong_call() -> None:
    parser = ToolCallParser()
    with pytest.raises(ValueError, match="does not follow its grammar"):
        parser.feed('<tool_call>{"nome": "f"')


def test_a_call_cut_short_keeps_what_streamed() -> None:
    text = call_text("f", {"a": "long"})[: -len("}}</tool_call>")]
    _, deltas, parser = run(text, 4)
    assert parser.called and parser.calls == []
    assert "".join(d.arguments for d in deltas) == '{"a": "long"'

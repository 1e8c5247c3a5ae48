from __future__ import annotations

import pytest

from router.errors import InvalidArgument
from router.retrieval.config import RagConfig
from router.retrieval.rag import (
    Messages,
    Passage,
    RagRequest,
    fit,
    inject,
    passages_from_hits,
    question_of,
)
from router.retrieval.spec import Document, Filter, Hit, Range

CONFIG = RagConfig(template="Context:\n{passages}\nQ: {question}", passage_template="[{n}] {text}")
PASSAGES = [
    Passage("a", "a", 0.9, "alpha beta gamma"),
    Passage("b#1", "b", 0.8, "delta epsilon"),
    Passage("c", "c", 0.7, "zeta eta theta iota kappa"),
]


def words(messages: Messages | None, prompt: str | None) -> int:
    """Token counter for the tests: whitespace-separated words of the whole input."""
    if messages is None:
        return len((prompt or "").split())
    return sum(len(m["content"].split()) + 1 for m in messages)


def test_inject_puts_passages_best_first_into_the_prompt() -> None:
    _, prompt = inject(CONFIG, None, "why?", PASSAGES[:2])
    assert prompt == "Context:\n[1] alpha beta gamma\n\n[2] delta epsilon\nQ: why?"


def test_inject_rewrites_only_the_last_user_message() -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    messages, _ = inject(CONFIG, chat, None, PASSAGES[:1])
    assert messages is not None
    assert messages[:3] == chat[:3]
    assert messages[3] == {"role": "user", "content": "Context:\n[1] alpha beta gamma\nQ: second"}
    assert chat[3]["content"] == "second"  # the caller's list is untouched


def test_everything_fits_when_there_is_room() -> None:
    _, prompt, used = fit(CONFIG, None, "why?", PASSAGES, words, limit=100, max_passage_tokens=None)
    assert used == tuple(PASSAGES)
    assert prompt is not None and "[3] zeta" in prompt


def test_the_lowest_scoring_passages_are_dropped_first() -> None:
    # "why?" = 1 word; template words: "Context:" + "Q:" = 2; [n] markers 1 word each.
    full = words(None, inject(CONFIG, None, "why?", PASSAGES)[1])
    _, _, used = fit(CONFIG, None, "why?", PASSAGES, words, limit=full - 1, max_passage_tokens=None)
    assert [p.id for p in used] == ["a", "b#1"]
    _, _, used = fit(CONFIG, None, "why?", PASSAGES, words, limit=100, max_passage_tokens=8)
    assert [p.id for p in used] == ["a"]


def test_with_no_room_the_input_is_left_whole() -> None:
    question = "a very long question " * 10
    limit = words(None, question)
    messages, prompt, used = fit(
        CONFIG, None, question, PASSAGES, words, limit=limit, max_passage_tokens=None
    )
    assert used == () and prompt == question and messages is None


def test_the_question_is_the_last_user_message_or_the_prompt() -> None:
    chat = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    assert question_of(chat, None) == "one"
    assert question_of(None, "p") == "p"
    with pytest.raises(InvalidArgument, match="no user message"):
        question_of([{"role": "system", "content": "s"}], None)


def test_hits_without_text_or_below_min_score_are_left_out() -> None:
    hits = [
        Hit(Document("x#0", "chunk text", parent="x"), 0.9),
        Hit(Document("v"), 0.8),
        Hit(Document("y", "low"), 0.1),
    ]
    passages = passages_from_hits(hits, 0.5)
    assert passages == [Passage("x#0", "x", 0.9, "chunk text")]
    assert len(passages_from_hits(hits, None)) == 2


def test_request_defaults_and_bad_values_are_named() -> None:
    assert RagRequest("c").validate(CONFIG).top_k == CONFIG.default_top_k
    bad = [
        (RagRequest(""), "retrieval.collection"),
        (RagRequest("c", top_k=65), "retrieval.top_k=65"),
        (RagRequest("c", max_context_tokens=0), "retrieval.max_context_tokens=0"),
        (RagRequest("c", filter=Filter(ranges=(Range("year"),))), r"retrieval.filter.ranges\[0\]"),
    ]
    for request, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            request.validate(CONFIG)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RagConfig(template="{question}"), "must contain {passages}"),
        (RagConfig(template="{passages}"), "must contain {question}"),
        (RagConfig(passage_template="[{n}]"), "must contain {text}"),
        (RagConfig(template="{passages} {question} {oops}"), "bad placeholder"),
        (RagConfig(default_top_k=0), "default_top_k=0"),
    ],
)
def test_bad_templates_are_named(config: RagConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        config.validate()

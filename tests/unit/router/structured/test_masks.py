"""The runner's side of structured outputs: per-row masks from real matchers, applied by the
native sampler next to free rows, and matchers advanced by what was drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from backends.base import SamplingParams, StructuredOutput
from router.scheduler.request import Request
from router.scheduler.runner import sample
from router.structured import masks
from router.structured.compiler import CompiledGrammar, GrammarCompiler

GEN = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer(prepared_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(prepared_models[GEN] / "tokenizer.json"))


@pytest.fixture(scope="module")
async def digits(tokenizer: Tokenizer) -> CompiledGrammar:
    grammars = GrammarCompiler(GEN, tokenizer, tokenizer.get_vocab_size(), [0, 2])
    return await grammars.compile(StructuredOutput("regex", "[0-9]{3}"))


def request(grammar: CompiledGrammar | None, temperature: float = 1.0, seed: int = 7) -> Request:
    params = SamplingParams(max_tokens=8, temperature=temperature)
    req = Request(f"r{seed}", seed, [1, 2, 3], params, seed=seed)
    req.grammar = grammar
    return req


def allowed(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


@pytest.mark.parametrize("rows", [2, masks.PARALLEL_ROWS + 1])
def test_constrained_rows_draw_only_what_the_grammar_allows(
    tokenizer: Tokenizer, digits: CompiledGrammar, rows: int
) -> None:
    vocab = tokenizer.get_vocab_size()
    rng = np.random.default_rng(3)
    reqs = [request(digits if i % 2 == 0 else None, seed=i) for i in range(rows)]
    free_before = [r for r in reqs if r.grammar is None]
    text = [""] * rows
    for _ in range(4):  # three digits, then only the end tokens
        logits = [rng.standard_normal(vocab).astype(np.float32) * 4 for _ in reqs]
        tokens = sample(reqs, logits)
        assert masks.advance(reqs, tokens) == {}
        for i, (req, token) in enumerate(zip(reqs, tokens, strict=True)):
            req.append(token)
            if req.grammar is not None:
                text[i] += allowed(tokenizer, token)
    for i, req in enumerate(reqs):
        if req.grammar is None:
            assert req.matcher is None
            continue
        assert req.matcher is not None and req.matcher.is_stopped()
        assert text[i][:3].isdigit() and len(text[i]) >= 3
        assert int(req.output_ids[-1]) in (0, 2)  # the grammar was complete: an end token
    assert free_before  # free rows took part in the same calls


def test_a_free_row_samples_as_it_would_alone(
    tokenizer: Tokenizer, digits: CompiledGrammar
) -> None:
    vocab = tokenizer.get_vocab_size()
    logits = np.random.default_rng(4).standard_normal((2, vocab)).astype(np.float32)
    together = sample([request(digits, seed=1), request(None, seed=2)], list(logits))
    alone = sample([request(None, seed=2)], [logits[1]])
    assert together[1] == alone[0]


def test_a_matcher_in_error_fails_its_row(tokenizer: Tokenizer, digits: CompiledGrammar) -> None:
    req = request(digits)
    req.matcher = digits.new_matcher()
    letter = tokenizer.encode("x", add_special_tokens=False).ids[0]
    errors = masks.advance([req], [letter])
    assert list(errors) == [0] and "structured output failed" in errors[0]
    with pytest.raises(masks.ConstraintError, match="structured output failed"):
        masks.fill([req], tokenizer.get_vocab_size())

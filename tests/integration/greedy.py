"""Greedy answers compared across batch compositions. A prompt's KV may come in other chunks
(the prefix cache, the step budget), whose float order differs a little, so a greedy choice
between two near-equal tokens may flip; a divergence is accepted only where it is exactly such
a near-tie in the solo run."""

from __future__ import annotations

import numpy as np

from backends.onnx_runtime import OnnxDecoder
from router.models.chat_template import render_chat
from router.serving.model import ServedModel

NEAR_TIE = 0.25
"""Largest logit gap between the two tokens at a divergence (float order is far below)."""


def check_same_or_near_tie(
    model: ServedModel, decoder: OnnxDecoder, prompt: str, got: list[int], want: list[int]
) -> bool:
    """True when `got` equals the solo answer `want`; else assert the first difference is a
    near-tie between the same two tokens in the solo run (and return False)."""
    if got == want:
        return True
    assert model.tokenizer is not None
    k = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
    text = render_chat(model.manifest["chat_template"], [{"role": "user", "content": prompt}])
    prompt_ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    # The solo run's own computation: the prompt through the engine's prefill graph, then one
    # decode step per answer token (int8 and int4 graphs differ by far more than the rounding
    # this forgives, so one prefill over prompt and answer would not say how near the tie was).
    logits = decoder.prefill(0, np.array(prompt_ids, dtype=np.int64), 0)
    for i, token in enumerate(want[:k]):
        position = np.array([len(prompt_ids) + i])
        logits = decoder.decode(np.array([0]), np.array([token]), position)[0]
    decoder.release(0)
    top2 = np.argsort(logits)[-2:]
    gap = float(logits[top2[1]] - logits[top2[0]])
    assert {got[k], want[k]} == set(top2.tolist()) and gap < NEAR_TIE, (prompt, k, gap)
    return False

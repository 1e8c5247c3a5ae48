"""The exported fp32 decoder against a plain NumPy llama over the same GGUF weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_reference import llama_greedy, llama_logits
from tokenizers import Tokenizer

from backends.onnx_runtime import OnnxDecoder
from router.models.gguf_weights import LlamaWeights

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n",
    "The three primary colours are",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def fp32(prepared_models: dict[str, Path]) -> OnnxDecoder:
    return OnnxDecoder(prepared_models["smollm2-135m-instruct-fp32"], max_slots=2, max_context=128)


@pytest.fixture(scope="module")
def tokenizer(prepared_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(prepared_models["smollm2-135m-instruct"] / "tokenizer.json"))


def _greedy(engine: OnnxDecoder, ids: list[int], n: int) -> list[int]:
    logits = engine.prefill(0, np.array(ids), 0)
    out = [int(np.argmax(logits))]
    for i in range(n - 1):
        logits = engine.decode(np.array([0]), np.array([out[-1]]), np.array([len(ids) + i]))[0]
        out.append(int(np.argmax(logits)))
    engine.release(0)
    return out


def test_prefill_logits_match_reference(
    fp32: OnnxDecoder, llama_weights: LlamaWeights, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(PROMPTS[0]).ids
    got = fp32.prefill(0, np.array(ids), 0)
    fp32.release(0)
    np.testing.assert_allclose(got, llama_logits(llama_weights, ids)[-1], atol=2e-3, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_reference(
    fp32: OnnxDecoder, llama_weights: LlamaWeights, tokenizer: Tokenizer, prompt: str
) -> None:
    ids = tokenizer.encode(prompt).ids
    assert _greedy(fp32, ids, NEW_TOKENS) == llama_greedy(llama_weights, ids, NEW_TOKENS)

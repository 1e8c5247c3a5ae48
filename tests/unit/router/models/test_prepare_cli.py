"""`irouter models prepare --int8`: the whole decoder at int8, served like any prepared folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from backends.onnx_runtime import OnnxDecoder
from router import cli

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_prepare_int8_writes_a_servable_int8_decoder(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IROUTER_MODEL_CACHE", str(model_cache))
    assert cli.main(["models", "prepare", "--int8"]) == 0
    folder = model_cache / "smollm2-135m-instruct-int8"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["quantization"] == "int8" and "prefill_graph" not in manifest
    decoder = OnnxDecoder(folder, max_slots=1, max_context=64)
    assert decoder.prefill_graph == "model"  # the graph is int8 already
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = np.array(tokenizer.encode(CHAT).ids, np.int64)
    tokens = [int(np.argmax(decoder.prefill(0, ids, 0)))]
    for i in range(11):
        step = decoder.decode(np.array([0]), np.array([tokens[-1]]), np.array([len(ids) + i]))
        tokens.append(int(np.argmax(step[0])))
    assert "Paris" in tokenizer.decode(tokens)

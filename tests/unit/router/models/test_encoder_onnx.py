from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from model_reference import bert_embeddings
from tokenizers import Tokenizer

TEXTS = ["A man is eating food.", "The quick brown fox jumps over the lazy dog.", "héllo 🎉 12345"]


def test_embeddings_match_numpy_bert(
    prepared_models: dict[str, Path], bert_tensors: dict[str, np.ndarray]
) -> None:
    folder = prepared_models["all-minilm-l6-v2"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(TEXTS)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(
        ["embeddings"],
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
    )
    ref = bert_embeddings(bert_tensors, ids, mask, num_heads=12)
    assert out.shape == (3, 384)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)

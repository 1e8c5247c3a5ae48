"""A prepared model folder as engines read it: its manifest (written by `irouter models
prepare`) and the input format of its encoder graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import IntArray


def encoder_inputs(
    input_ids: IntArray, attention_mask: IntArray, max_length: int
) -> dict[str, IntArray]:
    """A BERT-style encoder's feeds, checked: equal non-empty [B, L] int64 ids and mask, L within
    max_length, token types all zero (one segment)."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(
            f"input_ids and attention_mask must be equal non-empty [B, L] arrays, got "
            f"{ids.shape} and {mask.shape}"
        )
    if ids.shape[1] > max_length:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds max_length={max_length}")
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """Load model_dir/manifest.json (written by the model preparation step)."""
    path = Path(model_dir) / "manifest.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist; prepare the model first (`irouter models prepare`)"
        ) from None
    return data

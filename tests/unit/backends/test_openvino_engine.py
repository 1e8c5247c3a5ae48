"""OpenVinoEncoder and the device/precision checks shared by the OpenVINO engines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from backends.base import EncoderEngine
from backends.factory import create_backend
from backends.onnx_runtime import OnnxEncoder
from backends.openvino.engine import OpenVinoEncoder, check_device, core

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "OpenVINO runs this encoder.",
    "naïve café — 東京",
    "a",
]


def _batch(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(TEXTS)
    ids = np.array([e.ids for e in encodings], np.int64)
    mask = np.array([e.attention_mask for e in encodings], np.int64)
    return ids, mask


def test_f32_vectors_match_onnx_runtime(prepared_models: dict[str, Path]) -> None:
    model_dir = prepared_models["all-minilm-l6-v2"]
    ids, mask = _batch(model_dir)
    engine = create_backend("openvino", model_dir, threads=1, precision="f32")
    assert isinstance(engine, OpenVinoEncoder) and isinstance(engine, EncoderEngine)
    got = engine.encode(ids, mask)
    want = OnnxEncoder(model_dir, threads=1).encode(ids, mask)
    assert got.shape == (len(TEXTS), engine.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Padding must not leak into a row: each text alone gives its batched vector.
    alone = engine.encode(ids[3:4, : int(mask[3].sum())], mask[3:4, : int(mask[3].sum())])
    np.testing.assert_allclose(alone[0], got[3], atol=1e-5, rtol=0)


def test_bad_device_lists_the_devices_present(prepared_models: dict[str, Path]) -> None:
    present = core().available_devices
    with pytest.raises(ValueError, match=r"device='NOPE' is not available") as info:
        OpenVinoEncoder(prepared_models["all-minilm-l6-v2"], device="NOPE")
    assert str(present) in str(info.value)


@pytest.mark.parametrize(
    ("device", "ok"),
    [
        ("CPU", True),
        ("GPU", True),  # matches GPU.0
        ("GPU.0", True),
        ("GPU.1", False),
        ("NPU", False),
        ("AUTO", True),
        ("AUTO:GPU,CPU", True),
        ("AUTO:NPU", False),
        ("HETERO:GPU.0,CPU", True),
        ("HETERO:", False),
        ("HETERO:CPU,NPU", False),
        ("CPU:1", False),
    ],
)
def test_device_names_are_checked_against_those_present(device: str, ok: bool) -> None:
    present = ["CPU", "GPU.0"]
    if ok:
        assert check_device(device, present) == device
    else:
        with pytest.raises(ValueError, match=r"devices present: \['CPU', 'GPU.0'\]"):
            check_device(device, present)


def test_unknown_precision_names_the_accepted_ones(prepared_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"precision='fp8'.*'f32'"):
        OpenVinoEncoder(prepared_models["all-minilm-l6-v2"], precision="fp8")

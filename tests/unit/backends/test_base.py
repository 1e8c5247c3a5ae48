from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from backends import base
from backends.base import BURST_GAP_S, BURST_WINDOW_S, Capabilities, gather_burst
from backends.factory import create_backend
from backends.onnx_runtime import OnnxDecoder, OnnxEncoder


def test_unknown_kind_names_it_and_the_accepted_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'tensorrt'.*accepted: onnxruntime"):
        create_backend("tensorrt", tmp_path)


def test_missing_manifest_says_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prepare the model"):
        create_backend("onnxruntime", tmp_path)


def test_factory_picks_engine_from_manifest(prepared_models: dict[str, Path]) -> None:
    dec = create_backend(
        "onnxruntime", prepared_models["smollm2-135m-instruct"], max_slots=2, max_context=64
    )
    enc = create_backend("onnxruntime", prepared_models["all-minilm-l6-v2"], threads=1)
    assert isinstance(dec, OnnxDecoder) and dec.capabilities.context_length == 64
    assert isinstance(enc, OnnxEncoder) and enc.capabilities.embed


def test_capabilities_are_frozen() -> None:
    caps = Capabilities(
        generate=True, embed=False, stream=True, device="cpu", max_batch=4, context_length=128
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.max_batch = 8  # type: ignore[misc]


def test_gather_burst_ends_at_the_first_gap_or_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: now[0])
    waits: list[float] = []

    def three_then_none(timeout: float) -> bool:
        waits.append(timeout)
        now[0] += 0.001
        return len(waits) <= 3

    gather_burst(three_then_none)
    assert waits == [BURST_GAP_S] * 4

    waits.clear()

    def endless(timeout: float) -> bool:  # a call every millisecond, for ever
        waits.append(timeout)
        now[0] += 0.001
        return True

    gather_burst(endless)
    assert len(waits) == round(BURST_WINDOW_S / 0.001)
    assert all(0 < w <= BURST_GAP_S for w in waits)

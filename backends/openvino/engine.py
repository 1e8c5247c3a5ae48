"""OpenVINO runtime: device and precision checks shared by its engines, and the sentence encoder.

The factory imports this module only for models configured with `backend: openvino`, so
openvino need not be installed to serve ONNX Runtime models. (`backends.openvino` never shadows
the `openvino` library: imports are absolute and backends/ itself is not on sys.path.)
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from backends.artifact import encoder_inputs, read_manifest
from backends.base import PRECISIONS, Capabilities, FloatArray, IntArray

logger = logging.getLogger(__name__)

VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")
"""Devices that schedule onto others, written NAME or NAME:<device>,<device>."""

_core: ov.Core | None = None
_core_lock = threading.Lock()


def core() -> ov.Core:
    """The process's one OpenVINO Core (creating one per engine re-reads the plugins)."""
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


def check_device(device: str, available: list[str] | None = None) -> str:
    """Return `device` if OpenVINO can run on it here; otherwise ValueError naming the devices
    present. 'GPU' matches 'GPU.0'; 'AUTO', 'HETERO:GPU,CPU' and the like have their listed
    devices checked."""
    present = list(core().available_devices if available is None else available)

    def known(name: str) -> bool:
        return any(d == name or d.split(".")[0] == name for d in present)

    head, sep, tail = device.partition(":")
    if head in VIRTUAL_DEVICES:
        parts = [p.split("(")[0].strip() for p in tail.split(",") if p.strip()]
        ok = (head == "AUTO" or bool(parts)) and all(known(p) for p in parts)
    else:
        ok = not sep and known(device)
    if not ok:
        raise ValueError(
            f"device={device!r} is not available to OpenVINO here; devices present: {present} "
            f"(also AUTO, or HETERO:/MULTI: followed by a comma-separated list of them)"
        )
    return device


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not supported; use one of {list(PRECISIONS)} "
            "('' keeps the device default, 'f32' gives exact results)"
        )
    return precision


def compile_properties(precision: str, threads: int) -> dict[str, Any]:
    """Properties every compiled model gets: thread count and the inference precision."""
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    props: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if precision:
        props["INFERENCE_PRECISION_HINT"] = precision
    return props


class OpenVinoEncoder:
    """EncoderEngine over a prepared encoder folder: OpenVINO reads its model.onnx, whose graph
    already mean-pools and L2-normalises (output 'embeddings')."""

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int = 2,
        max_batch: int = 64,
        device: str = "CPU",
        precision: str = "",
    ) -> None:
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        if manifest.get("kind") != "encoder":
            raise ValueError(
                f"{model_dir} holds a {manifest.get('kind')!r} model; this engine needs an "
                "'encoder'"
            )
        self.dim = int(manifest["embedding_dim"])
        self.max_length = int(manifest["max_length"])
        self.device = check_device(device)
        self.precision = check_precision(precision)
        self.capabilities = Capabilities(
            generate=False,
            embed=True,
            stream=False,
            device=device,
            max_batch=max_batch,
            context_length=self.max_length,
        )
        props = compile_properties(precision, threads)
        props["PERFORMANCE_HINT"] = "LATENCY"
        self._compiled = core().compile_model(str(model_dir / "model.onnx"), device, props)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        logger.info("encoder %s on OpenVINO %s (%s)", manifest.get("name"), device, props)

    def encode(self, input_ids: IntArray, attention_mask: IntArray) -> FloatArray:
        inputs = encoder_inputs(input_ids, attention_mask, self.max_length)
        with self._lock:  # one infer request: its output buffer is reused by the next call
            result = self._request.infer(inputs)
            out: FloatArray = np.array(result["embeddings"], dtype=np.float32, copy=True)
        return out

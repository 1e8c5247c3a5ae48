"""Engine protocols shared by the router and every backend; engines never import router/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

BACKEND_KINDS: tuple[str, ...] = ("onnxruntime",)
"""Values accepted by create_backend(kind=...)."""


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, so the router can route and size batches without knowing it."""

    generate: bool
    """Produces next-token logits (a decoder)."""
    embed: bool
    """Produces sentence embeddings (an encoder)."""
    stream: bool
    """Tokens can be emitted one step at a time."""
    device: str
    """Where it runs, e.g. 'cpu'."""
    max_batch: int
    """Most sequences one call may carry (decoder: KV slots)."""
    context_length: int
    """Longest sequence in tokens (decoder: prompt + generated; encoder: input)."""


@runtime_checkable
class DecoderStepEngine(Protocol):
    """A decoder driven one step at a time over fixed KV slots.

    Synchronous: the caller runs it in a worker thread. A slot holds one sequence's KV cache;
    the caller allocates slots (lowest free first keeps batched decode cheap) and tells the
    engine when one is free.
    """

    capabilities: Capabilities
    vocab_size: int
    max_slots: int
    max_context: int

    def prefill(self, slot: int, token_ids: IntArray, start: int) -> FloatArray:
        """Compute token_ids at positions start.. into slot; logits [V] of the last one.

        May be called several times for one slot (chunked prefill): start = tokens already
        computed in that slot.
        """
        ...

    def decode(self, slots: IntArray, token_ids: IntArray, positions: IntArray) -> FloatArray:
        """One token per row (row i at positions[i] in slots[i]); logits [B, V] in row order."""
        ...

    def release(self, slot: int) -> None:
        """The slot's sequence is finished; the slot may be reused."""
        ...


@runtime_checkable
class EncoderEngine(Protocol):
    """A sentence-embedding model."""

    capabilities: Capabilities
    dim: int
    max_length: int

    def encode(self, input_ids: IntArray, attention_mask: IntArray) -> FloatArray:
        """int64 [B, L] ids and mask → float32 [B, dim], L2-normalised."""
        ...


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


def create_backend(kind: str, model_dir: Path, **options: Any) -> DecoderStepEngine | EncoderEngine:
    """Build the engine of backend `kind` for the model in model_dir.

    Decoder or encoder is chosen from the manifest's `kind`; options go to its constructor.
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; accepted: {', '.join(BACKEND_KINDS)}")
    manifest = read_manifest(model_dir)
    model_kind = manifest.get("kind")
    # Imported here so that importing the protocols never loads onnxruntime.
    from backends.onnx_runtime import OnnxDecoder, OnnxEncoder

    if model_kind == "decoder":
        return OnnxDecoder(Path(model_dir), **options)
    if model_kind == "encoder":
        return OnnxEncoder(Path(model_dir), **options)
    raise ValueError(
        f"manifest of {model_dir} has kind={model_kind!r}; expected 'decoder' or 'encoder'"
    )

"""Read a llama-architecture GGUF file into float32 NumPy weights in Hugging Face layout."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader
from gguf.quants import dequantize

logger = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numeric settings of a llama-architecture decoder, read from GGUF metadata."""

    num_layers: int
    """Number of transformer blocks."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU feed-forward layer."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads (grouped-query attention)."""
    head_dim: int
    """Width of one attention head."""
    vocab_size: int
    """Number of token ids."""
    context_length: int
    """Longest sequence the model was trained for."""
    rope_theta: float
    """RoPE frequency base."""
    rms_eps: float
    """Epsilon of every RMSNorm."""
    quantization: str
    """Name of the GGUF file type the weights were stored in (e.g. 'MOSTLY_Q4_1')."""


@dataclass
class LlamaWeights:
    """Dequantized float32 weights; matrices are [out_features, in_features] like torch Linear."""

    config: LlamaConfig
    embedding: F32Array
    """[vocab, hidden]; also the (tied) output projection."""
    final_norm: F32Array
    layers: list[dict[str, F32Array]] = field(default_factory=list)
    """Per block: attn_norm, q, k, v, o, ffn_norm, gate, up, down."""


class MetadataSource(Protocol):
    """What field_value reads: gguf's GGUFReader, or gguf_metadata.GGUFMetadata (fast, no
    weights)."""

    @property
    def fields(self) -> Mapping[str, Any]: ...


def field_value(reader: MetadataSource, key: str) -> Any:
    """Return the decoded value of a GGUF metadata field, or None when absent."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_config(reader: MetadataSource) -> LlamaConfig:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture={arch!r} is not supported; expected 'llama'")

    def get(key: str) -> Any:
        value = field_value(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = field_value(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(field_value(reader, "tokenizer.ggml.tokens"))
    file_type = field_value(reader, "general.file_type")
    try:
        from gguf import LlamaFileType

        quantization = LlamaFileType(int(file_type)).name
    except (ValueError, TypeError):
        quantization = str(file_type)
    return LlamaConfig(
        num_layers=int(get("block_count")),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv")),
        head_dim=hidden // heads,
        vocab_size=int(vocab),
        context_length=int(get("context_length")),
        rope_theta=float(get("rope.freq_base")),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        quantization=quantization,
    )


def unpermute_qk(w: F32Array, n_head: int) -> F32Array:
    """Undo the row permutation llama.cpp's converter applies to Q and K projections.

    The converter reorders each head's rows from the Hugging Face "rotate_half" layout
    (first half, second half) into interleaved pairs so that ggml's RoPE can rotate
    adjacent elements. ONNX Runtime's rotary (rotary_interleaved=0) and our NumPy
    reference use the Hugging Face layout, so the permutation must be reversed.
    """
    out = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _tensor_f32(reader_tensor: Any) -> F32Array:
    data = dequantize(reader_tensor.data, reader_tensor.tensor_type)
    return np.ascontiguousarray(np.asarray(data, dtype=np.float32))


def load_llama_weights(gguf_path: Path) -> LlamaWeights:
    """Dequantize every tensor of a llama GGUF file to float32."""
    reader = GGUFReader(str(gguf_path))
    cfg = read_config(reader)
    tensors = {t.name: t for t in reader.tensors}

    def t(name: str) -> F32Array:
        if name not in tensors:
            raise ValueError(f"GGUF file {gguf_path} lacks tensor {name!r}")
        return _tensor_f32(tensors[name])

    embedding = t("token_embd.weight")
    if "output.weight" in tensors:
        # Tied embeddings are the norm for small llamas; an untied head is not supported
        # because the exported graph reuses the embedding matrix.
        raise ValueError("untied output.weight is not supported by this exporter")
    weights = LlamaWeights(config=cfg, embedding=embedding, final_norm=t("output_norm.weight"))
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        weights.layers.append(
            {
                "attn_norm": t(p + "attn_norm.weight"),
                "q": unpermute_qk(t(p + "attn_q.weight"), cfg.num_heads),
                "k": unpermute_qk(t(p + "attn_k.weight"), cfg.num_kv_heads),
                "v": t(p + "attn_v.weight"),
                "o": t(p + "attn_output.weight"),
                "ffn_norm": t(p + "ffn_norm.weight"),
                "gate": t(p + "ffn_gate.weight"),
                "up": t(p + "ffn_up.weight"),
                "down": t(p + "ffn_down.weight"),
            }
        )
    logger.info("loaded %d layers from %s (%s)", cfg.num_layers, gguf_path, cfg.quantization)
    return weights

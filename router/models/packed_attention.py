"""Attention for a decoder graph that computes the prompts of several sequences in one call.

Graph contract (attention="packed" in decoder_onnx.build_decoder_model; fed by
backends.packed_prefill):

* inputs: ``input_ids`` and ``position_ids`` int64 [1, N]: every sequence's new tokens, one
  after the other; ``past_key_values.{i}.key`` float32 [kv_heads, M, head_dim] and
  ``.value`` [kv_heads, M, head_dim + 1] (last column 1): every sequence's computed tokens, one
  after the other (M may be 0); ``new_ones`` float32 [kv_heads, N, 1]: ones; ``key_index`` int64
  [B, T]: sequence b's keys in position order, indices into past (0..M-1) then new
  (M..M+N-1), then any index; ``query_index`` int64 [B, S]: its new tokens (0..N-1), then any
  index; ``attention_bias`` float32 [1, B, group * S, T] (group = heads / kv_heads, the same
  [S, T] for each): 0 where query s may see key t, a large negative number elsewhere (its
  exp must be exactly 0); ``output_index`` int64 [N]: each new token's place in the [B * S]
  padded layout; ``last_index`` int64 [B]: each sequence's last new token (0..N-1).
* outputs: ``logits`` float32 [B, vocab] of each sequence's last new token;
  ``present.{i}.key|value`` float32 [N, kv_heads, head_dim]: the new tokens' keys (rotated)
  and values, for the caller to store.

Why not GroupQueryAttention: ONNX Runtime's refuses a batch of more than one sequence with new
tokens and a past ("batch_size must be 1 when sequence_length > 1 and past context is given"),
so each prompt was its own call, and a call of a few tokens costs about what one of a hundred
does (the weights are read once per call: 8.5 ms for 1 token, 17 ms for 16, int8 graph, AMD
EPYC Zen 4). By hand: no ONNX Runtime op attends several sequences with pasts in one batch on
CPU (MultiHeadAttention would need the KV heads repeated for every query head).

Exactness: a token's result must not depend on what shares its call, nor on how its prompt was
chunked. The projections are row-wise; the attention reads each sequence's keys in position
order with padding only after its last key, and the softmax's sum is the last column of the
same matmul as its weighted values (the values' ones column), so every sum runs over the same
terms in the same order whatever the padding, and a padded key's weight is exactly 0 (checked
bit for bit: tests/unit/backends/test_packed_prefill.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from router.models.gguf_weights import LlamaConfig

MS_DOMAIN = "com.microsoft"


def packed_io(cfg: LlamaConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    def value(name: str, kind: int, shape: list[str | int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, shape)

    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    kv, dim = cfg.num_kv_heads, cfg.head_dim
    inputs = [
        value("input_ids", i64, [1, "tokens"]),
        value("position_ids", i64, [1, "tokens"]),
        value("new_ones", f32, [kv, "tokens", 1]),
        value("key_index", i64, ["batch", "keys"]),
        value("query_index", i64, ["batch", "queries"]),
        value("attention_bias", f32, [1, "batch", "group_queries", "keys"]),
        value("output_index", i64, ["tokens"]),
        value("last_index", i64, ["batch"]),
    ]
    outputs = [value("logits", f32, ["batch", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        inputs.append(value(f"past_key_values.{i}.key", f32, [kv, "past", dim]))
        inputs.append(value(f"past_key_values.{i}.value", f32, [kv, "past", dim + 1]))
        for kind in ("key", "value"):
            outputs.append(value(f"present.{i}.{kind}", f32, ["tokens", kv, dim]))
    return inputs, outputs


def packed_constants(cfg: LlamaConfig) -> dict[str, np.ndarray]:
    heads, kv, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = heads // kv
    return {
        "pk_split": np.array([heads * dim, kv * dim, kv * dim], np.int64),
        "pk_q_heads": np.array([-1, kv, group * dim], np.int64),
        "pk_kv_heads": np.array([-1, kv, dim], np.int64),
        "pk_q_groups": np.array([kv, 0, 0, group, dim], np.int64),
        "pk_q_rows": np.array([kv, 0, -1, dim], np.int64),
        "pk_out": np.array([kv, 0, group, -1, dim], np.int64),
        "pk_flat": np.array([-1, heads * dim], np.int64),
        "pk_packed": np.array([1, -1, heads * dim], np.int64),
        "pk_rows": np.array([-1, cfg.hidden_size], np.int64),
        "pk_last": np.array([-1], np.int64),
        "pk_dim": np.array([dim], np.int64),
        "pk_dim1": np.array([dim + 1], np.int64),
        "pk_zero": np.array([0], np.int64),
    }


def packed_attention(cfg: LlamaConfig, i: int, node: Any) -> None:
    """Layer i's attention over l{i}.qkv [1, N, (heads + 2 kv_heads) * head_dim] into l{i}.attn
    [1, N, heads * head_dim] (PACKED_CONTRACT). Head-major inside: [kv, B, ...]."""
    p = f"l{i}."
    rotary = {"domain": MS_DOMAIN, "interleaved": 0}
    node("Split", [p + "qkv", "pk_split"], [p + "q", p + "k", p + "v"], axis=-1)
    node(
        "RotaryEmbedding",
        [p + "q", "position_ids", "cos_cache", "sin_cache"],
        [p + "qr"],
        num_heads=cfg.num_heads,
        **rotary,
    )
    node(
        "RotaryEmbedding",
        [p + "k", "position_ids", "cos_cache", "sin_cache"],
        [p + "kr"],
        num_heads=cfg.num_kv_heads,
        **rotary,
    )
    # The new tokens' keys and values (returned for the caller to store) join the past; each
    # sequence's keys are gathered in position order: [kv, B, T, D] (values: D + 1, ones last).
    node("Reshape", [p + "kr", "pk_kv_heads"], [f"present.{i}.key"])
    node("Reshape", [p + "v", "pk_kv_heads"], [f"present.{i}.value"])
    node("Transpose", [f"present.{i}.key"], [p + "kn"], perm=[1, 0, 2])
    node("Transpose", [f"present.{i}.value"], [p + "vn"], perm=[1, 0, 2])
    node("Concat", [p + "vn", "new_ones"], [p + "vn1"], axis=-1)
    node("Concat", [f"past_key_values.{i}.key", p + "kn"], [p + "kpool"], axis=1)
    node("Concat", [f"past_key_values.{i}.value", p + "vn1"], [p + "vpool"], axis=1)
    node("Gather", [p + "kpool", "key_index"], [p + "keys"], axis=1)
    node("Gather", [p + "vpool", "key_index"], [p + "values"], axis=1)
    # Queries (scaled in their weights): [1, N, heads*D] -> [kv, N, group*D] -> [kv, B, S, group, D]
    # -> [kv, B, group, S, D] -> [kv, B, group*S, D].
    node("Reshape", [p + "qr", "pk_q_heads"], [p + "qh"])
    node("Transpose", [p + "qh"], [p + "qt"], perm=[1, 0, 2])
    node("Gather", [p + "qt", "query_index"], [p + "qb"], axis=1)
    node("Reshape", [p + "qb", "pk_q_groups"], [p + "qg"])
    node("Transpose", [p + "qg"], [p + "q5"], perm=[0, 1, 3, 2, 4])
    node("Reshape", [p + "q5", "pk_q_rows"], [p + "q4"])
    node("FusedMatMul", [p + "q4", p + "keys"], [p + "scores"], domain=MS_DOMAIN, transB=1)
    node("Add", [p + "scores", "attention_bias"], [p + "biased"])  # [kv, B, group*S, T]
    node("ReduceMax", [p + "biased", "pk_last"], [p + "max"], keepdims=1)
    node("Sub", [p + "biased", p + "max"], [p + "shifted"])
    node("Exp", [p + "shifted"], [p + "weights"])
    node("MatMul", [p + "weights", p + "values"], [p + "wv"])  # [kv, B, group*S, D + 1]
    node("Slice", [p + "wv", "pk_zero", "pk_dim", "pk_last"], [p + "num"])
    node("Slice", [p + "wv", "pk_dim", "pk_dim1", "pk_last"], [p + "den"])
    node("Div", [p + "num", p + "den"], [p + "o4"])
    node("Reshape", [p + "o4", "pk_out"], [p + "o5"])  # [kv, B, group, S, D]
    node("Transpose", [p + "o5"], [p + "ot"], perm=[1, 3, 0, 2, 4])  # [B, S, kv, group, D]
    node("Reshape", [p + "ot", "pk_flat"], [p + "of"])  # [B * S, heads * D]
    node("Gather", [p + "of", "output_index"], [p + "on"], axis=0)  # [N, heads * D]
    node("Reshape", [p + "on", "pk_packed"], [p + "attn"])

"""Export a llama decoder (dequantized GGUF weights) to an ONNX graph built on ORT contrib ops.

Graph contract (consumed by backends/onnx_runtime.py):

* inputs: ``input_ids`` int64 [B, S]; ``seqlens_k`` int32 [B] = (tokens in the sequence after
  this step) - 1; ``total_sequence_length`` int32 scalar = max over rows of seqlens_k + 1;
  ``past_key_values.{i}.key|value`` float32 [B, kv_heads, T, head_dim].
* outputs: ``logits`` float32 [B, vocab] of the LAST position only (prefill never needs the
  others, and the 49152-wide head is the single most expensive matmul per token);
  ``present.{i}.key|value`` with the same shape as the past.

Attention is ``com.microsoft.GroupQueryAttention`` with rotary inside the op. When the engine
binds the same buffer as past and present, ORT writes the new K/V in place at position
``seqlens_k - S + 1`` and attends to positions ``<= seqlens_k`` only, so the KV cache is never
copied between steps and T can be a fixed, preallocated capacity.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from router.models.gguf_weights import F32Array, LlamaConfig, LlamaWeights

logger = logging.getLogger(__name__)

OPSET = 18
MS_DOMAIN = "com.microsoft"
EXTERNAL_DATA_NAME = "model.onnx.data"


def rope_caches(cfg: LlamaConfig, max_positions: int) -> tuple[F32Array, F32Array]:
    """cos/sin tables [max_positions, head_dim/2] in the Hugging Face (rotate_half) convention."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    )
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def build_decoder_model(weights: LlamaWeights) -> onnx.ModelProto:
    """Build the float32 decoder graph; weights become initializers."""
    cfg = weights.config
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any
    ) -> None:
        nodes.append(
            helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs)
        )

    kv_shape: list[str | int] = ["batch", cfg.num_kv_heads, "kv_capacity", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])
    ]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape
                )
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_shape)
            )

    cos, sin = rope_caches(cfg, cfg.context_length)
    init("cos_cache", cos)
    init("sin_cache", sin)
    init("embed_tokens", weights.embedding)
    node("Gather", ["embed_tokens", "input_ids"], ["embeds"])

    eps = cfg.rms_eps
    residual = "embeds"
    for i, layer in enumerate(weights.layers):
        p = f"l{i}."
        if i == 0:
            node(
                "SimplifiedLayerNormalization",
                [residual, init(p + "attn_norm", layer["attn_norm"])],
                [p + "attn_in"],
                axis=-1,
                epsilon=eps,
            )
        else:
            # The skip variant adds the previous block's output to the residual stream and
            # normalises in one kernel; output 3 is the new residual.
            node(
                "SkipSimplifiedLayerNormalization",
                [residual, f"l{i - 1}.mlp_out", init(p + "attn_norm", layer["attn_norm"])],
                [p + "attn_in", "", "", p + "resid_attn"],
                domain=MS_DOMAIN,
                epsilon=eps,
            )
            residual = p + "resid_attn"
        # One fused QKV projection: fewer MatMulNBits launches per token than three.
        wqkv = np.concatenate([layer["q"], layer["k"], layer["v"]], axis=0).T
        node("MatMul", [p + "attn_in", init(p + "qkv_proj.weight", wqkv)], [p + "qkv"])
        node(
            "GroupQueryAttention",
            [
                p + "qkv",
                "",
                "",
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                "seqlens_k",
                "total_sequence_length",
                "cos_cache",
                "sin_cache",
            ],
            [p + "attn", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            num_heads=cfg.num_heads,
            kv_num_heads=cfg.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(cfg.head_dim**-0.5),
        )
        node("MatMul", [p + "attn", init(p + "o_proj.weight", layer["o"].T)], [p + "attn_out"])
        node(
            "SkipSimplifiedLayerNormalization",
            [residual, p + "attn_out", init(p + "ffn_norm", layer["ffn_norm"])],
            [p + "ffn_in", "", "", p + "resid_ffn"],
            domain=MS_DOMAIN,
            epsilon=eps,
        )
        residual = p + "resid_ffn"
        gate_up = np.concatenate([layer["gate"], layer["up"]], axis=0).T
        node("MatMul", [p + "ffn_in", init(p + "gate_up_proj.weight", gate_up)], [p + "gate_up"])
        node("Split", [p + "gate_up"], [p + "gate", p + "up"], axis=-1, num_outputs=2)
        node("Sigmoid", [p + "gate"], [p + "gate_sig"])
        node("Mul", [p + "gate", p + "gate_sig"], [p + "gate_silu"])
        node("Mul", [p + "gate_silu", p + "up"], [p + "act"])
        node("MatMul", [p + "act", init(p + "down_proj.weight", layer["down"].T)], [p + "mlp_out"])

    last = cfg.num_layers - 1
    node(
        "SkipSimplifiedLayerNormalization",
        [residual, f"l{last}.mlp_out", init("final_norm", weights.final_norm)],
        ["final_hidden"],
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    init("last_start", np.array([-1], dtype=np.int64))
    init("last_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    init("seq_axis", np.array([1], dtype=np.int64))
    node("Slice", ["final_hidden", "last_start", "last_end", "seq_axis"], ["last_hidden3"])
    node("Squeeze", ["last_hidden3", "seq_axis"], ["last_hidden"])
    # Tied head: a transposed copy, so the int4 quantizer (which only rewrites MatMul with a
    # constant B) can compress it while the Gather keeps the exact float32 table.
    node("MatMul", ["last_hidden", init("lm_head.weight", weights.embedding.T)], ["logits"])

    graph = helper.make_graph(nodes, "llama_decoder", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="irouter",
    )
    model.ir_version = 10
    return model


def quantize_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weight-only int4 (MatMulNBits) quantization of every MatMul with constant weights.

    Symmetric blocks of 32: asymmetric int4 was measured to damage SmolLM2's text.
    accuracy_level=4 lets the CPU kernel compute in int8, the fast path on x86.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4)
    # The quantizer logs an INFO line per node on its own handler: keep prepare's output readable.
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = qlog.level
    qlog.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        qlog.setLevel(level)
    result: onnx.ModelProto = quantizer.model.model
    return result


def save_model(model: onnx.ModelProto, out_dir: Path) -> Path:
    """Save as out_dir/model.onnx with weights in one external data file.

    out_dir must be fresh: ONNX appends to an existing external data file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    if (out_dir / EXTERNAL_DATA_NAME).exists():
        raise FileExistsError(f"{out_dir / EXTERNAL_DATA_NAME} exists; write to a fresh folder")
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
        size_threshold=1024,
    )
    return path


def export_decoder(weights: LlamaWeights, out_dir: Path, *, precision: str = "int4") -> Path:
    """Write out_dir/model.onnx (+ external data) at precision 'fp32' or 'int4'."""
    if precision not in ("fp32", "int4"):
        raise ValueError(f"precision={precision!r} is not supported; expected 'fp32' or 'int4'")
    model = build_decoder_model(weights)
    if precision == "int4":
        model = quantize_int4(model)
    logger.info("saving %s decoder to %s", precision, out_dir)
    return save_model(model, out_dir)

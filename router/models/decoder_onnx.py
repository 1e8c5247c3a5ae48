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
from router.models.packed_attention import (
    MS_DOMAIN,
    packed_attention,
    packed_constants,
    packed_io,
)

logger = logging.getLogger(__name__)

OPSET = 18


def rope_caches(cfg: LlamaConfig, max_positions: int) -> tuple[F32Array, F32Array]:
    """cos/sin tables [max_positions, head_dim/2] in the Hugging Face (rotate_half) convention."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    )
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


ATTENTIONS = ("gqa", "packed")


def build_decoder_model(weights: LlamaWeights, attention: str = "gqa") -> onnx.ModelProto:
    """Build the float32 decoder graph; weights become initializers. `attention`: "gqa" (the
    module's contract: GroupQueryAttention over the KV slots, in place) or "packed" (the
    prompts of several sequences in one call: router.models.packed_attention)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is unknown; use one of {list(ATTENTIONS)}")
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

    packed = attention == "packed"
    inputs, outputs = packed_io(cfg) if packed else _gqa_io(cfg)

    if packed:
        for name, value in packed_constants(cfg).items():
            init(name, value)
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
        # Packed attention scales the queries in their weights, not with a Mul in every layer.
        q = layer["q"] * np.float32(cfg.head_dim**-0.5) if packed else layer["q"]
        wqkv = np.concatenate([q, layer["k"], layer["v"]], axis=0).T
        node("MatMul", [p + "attn_in", init(p + "qkv_proj.weight", wqkv)], [p + "qkv"])
        if packed:
            packed_attention(cfg, i, node)
        else:
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
    if packed:
        node("Reshape", ["final_hidden", "pk_rows"], ["final_rows"])
        node("Gather", ["final_rows", "last_index"], ["last_hidden"], axis=0)
    else:
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


def _gqa_io(cfg: LlamaConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
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
    return inputs, outputs


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


INT8_WEIGHT_MAX = 63
"""Weights are quantized to 7 bits (-63..63): CPUs without VNNI multiply u8 by s8 with
VPMADDUBSW, whose int16 pair sums saturate above 2 x 255 x 64 (ONNX Runtime's quantization docs,
'reduce_range'); 7 bits keep the graph exact on every x86 kernel. Measured over 111 positions of
11 prompts, KL from the fp32 graph: 7 bits with the head in float 0.13 nats, 8 bits 0.12, the
int4 graph ~0.5; which side of a near tie a greedy answer takes is luck at either width (each
turned one of two test answers, decoder_onnx's history in BENCHMARKS.md)."""


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every MatMul with constant weights as an int8 matmul: weights per output channel
    (symmetric, INT8_WEIGHT_MAX), activations per token (row) at run time, so a row's result
    never depends on the other rows of its batch or chunk. Per row: its scale max|x| / 127,
    its codes by a blocked QuantizeLinear (one block a row: opset 21), and MatMulIntegerToFloat
    (ONNX Runtime's integer GEMM: VNNI, AMX) scales the int32 sums by the row's and the
    column's scales in its output pass. Measured on an AVX-512 AMD EPYC: prefill 1.7x and 16
    decode rows 1.4x the int4 graph's speed. By hand: ONNX Runtime's quantizers scale
    activations per tensor, which would make a row's tokens depend on its batch."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    shared: dict[str, np.ndarray] = {
        "q8_axis": np.array([-1], np.int64),
        "q8_tiny": np.array(1e-30, np.float32),
        "q8_levels": np.array(127.0, np.float32),
        "q8_zero": np.array(128, np.uint8),
        "q8_one": np.array([1], np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in shared.items())
    zero = helper.make_tensor("q8_zero", TensorProto.UINT8, [1], [128])
    rewritten: list[onnx.NodeProto] = [
        helper.make_node("Shape", ["input_ids"], ["q8_ids_shape"]),
        helper.make_node("Concat", ["q8_ids_shape", "q8_one"], ["q8_tokens_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["q8_tokens_shape"], ["q8_zero_tokens"], value=zero),
    ]
    for n in graph.node:
        # The head stays float: the first token is read straight off its logits, where int8
        # rounding tipped near ties (it runs once a sequence in prefill: ~1-2 ms a call).
        if n.op_type != "MatMul" or n.input[1] not in weights or n.input[0] == "last_hidden":
            rewritten.append(n)
            continue
        w = numpy_helper.to_array(weights[n.input[1]]).astype(np.float32)
        scale = np.maximum(np.abs(w).max(axis=0), 1e-30) / INT8_WEIGHT_MAX
        codes = np.clip(np.round(w / scale), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX).astype(np.int8)
        graph.initializer.remove(weights[n.input[1]])
        p, x = n.input[1] + ".", n.input[0]
        graph.initializer.extend(
            [numpy_helper.from_array(codes, p + "q8"), numpy_helper.from_array(scale, p + "scale")]
        )

        def add(op: str, inputs: list[str], output: str, domain: str = "", **attrs: Any) -> str:
            rewritten.append(
                helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs)
            )
            return output

        amax = add("ReduceMax", [add("Abs", [x], p + "abs"), "q8_axis"], p + "amax", keepdims=1)
        x_scale = add("Div", [add("Max", [amax, "q8_tiny"], p + "amax_"), "q8_levels"], p + "xs")
        # u8 codes, zero point 128 (a signed A took ONNX Runtime's slow path: 20x); one block
        # a row: the scale's last axis is 1, so block_size is the row's width, and the zero
        # point must have the scale's shape.
        # Every quantized matmul's input is [input_ids' shape..., width]: one zero point shape.
        x_codes = add(
            "QuantizeLinear",
            [x, x_scale, "q8_zero_tokens"],
            p + "xq",
            axis=-1,
            block_size=int(w.shape[0]),
        )
        rewritten.append(
            helper.make_node(
                "MatMulIntegerToFloat",
                [x_codes, p + "q8", x_scale, p + "scale", "q8_zero"],
                [n.output[0]],
                name=p + "y",
                domain=MS_DOMAIN,
            )
        )
    del graph.node[:]
    graph.node.extend(rewritten)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = max(opset.version, 21)  # blocked QuantizeLinear
    return model


INT8_SCHEME = 2
"""How quantize_int8 builds its graphs (recorded in manifests: older folders are built again).
1: MatMulInteger and eleven small ops a matmul, the head in int8; 2: blocked QuantizeLinear and
MatMulIntegerToFloat (the same per-row and per-channel scales, five ops fewer), the head in
float."""

PREFILL_GRAPH = "prefill.onnx"
"""The int4 decoder's folder also holds its graph at int8 (quantize_int8) with packed attention
under this name: the engine may compute prompts with it, several a call
(backends.packed_prefill)."""


def save_model(model: onnx.ModelProto, out_dir: Path, name: str = "model.onnx") -> Path:
    """Save as out_dir/name with weights in one external data file (name + '.data').

    The data file must not exist yet: ONNX appends to an existing external data file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    data = f"{name}.data"
    if (out_dir / data).exists():
        raise FileExistsError(f"{out_dir / data} exists; write to a fresh folder")
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=1024,
    )
    return path


def export_decoder(weights: LlamaWeights, out_dir: Path, *, precision: str = "int4") -> Path:
    """Write out_dir/model.onnx (+ external data) at precision 'fp32', 'int4' or 'int8'; at
    'int4', also the int8 graph with packed attention (several prompts a call) as
    out_dir/PREFILL_GRAPH."""
    if precision not in ("fp32", "int4", "int8"):
        raise ValueError(
            f"precision={precision!r} is not supported; expected 'fp32', 'int4' or 'int8'"
        )
    model = build_decoder_model(weights)
    if precision == "int4":
        model = quantize_int4(model)
    elif precision == "int8":
        model = quantize_int8(model)
    logger.info("saving %s decoder to %s", precision, out_dir)
    path = save_model(model, out_dir)
    if precision == "int4":
        del model
        save_model(quantize_int8(build_decoder_model(weights, "packed")), out_dir, PREFILL_GRAPH)
    return path

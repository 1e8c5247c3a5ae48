"""Export a BERT sentence encoder (safetensors weights) to ONNX with pooling inside the graph.

Graph: input_ids, attention_mask, token_type_ids int64 [B, L] → embeddings float32 [B, H],
mean-pooled over attention_mask and L2-normalised (sentence-transformers' pipeline for
all-MiniLM-L6-v2), so an engine only pads, runs and returns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

logger = logging.getLogger(__name__)

OPSET = 18


@dataclass(frozen=True)
class BertConfig:
    """The parts of a Hugging Face BertConfig the exporter needs."""

    hidden_size: int
    """Width of every token vector (and of the sentence embedding)."""
    num_heads: int
    """Attention heads per layer."""
    num_layers: int
    """Transformer blocks."""
    max_positions: int
    """Rows of the position embedding table."""
    layer_norm_eps: float
    """Epsilon of every LayerNorm."""

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act={raw['hidden_act']!r} is not supported; expected 'gelu'")
        return cls(
            hidden_size=int(raw["hidden_size"]),
            num_heads=int(raw["num_attention_heads"]),
            num_layers=int(raw["num_hidden_layers"]),
            max_positions=int(raw["max_position_embeddings"]),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
        )


def load_bert_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """safetensors weights as float32, with any 'bert.' prefix removed."""
    raw = load_file(str(model_dir / "model.safetensors"))
    return {k.removeprefix("bert."): np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def build_encoder_model(tensors: dict[str, np.ndarray], cfg: BertConfig) -> onnx.ModelProto:
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def w(name: str) -> str:
        if name not in tensors:
            raise ValueError(f"safetensors file lacks tensor {name!r}")
        return init(name, tensors[name])

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{op}_{len(nodes)}", **attrs))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        # Weights are torch Linear [out, in]; store transposed so the graph is x @ W.
        wt = init(prefix + ".weight_t", tensors[prefix + ".weight"].T)
        return node("Add", [node("MatMul", [x, wt], out + "_mm"), w(prefix + ".bias")], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node(
            "LayerNormalization",
            [x, w(prefix + ".weight"), w(prefix + ".bias")],
            out,
            axis=-1,
            epsilon=cfg.layer_norm_eps,
        )

    h, heads = cfg.hidden_size, cfg.num_heads
    d = h // heads
    init("axis1", np.array([1], np.int64))
    init("heads_shape", np.array([0, 0, heads, d], np.int64))
    init("hidden_shape", np.array([0, 0, h], np.int64))
    init("scale", np.array(1.0 / np.sqrt(d), np.float32))
    init("neg_big", np.array(-1e9, np.float32))
    init("f_one", np.array(1.0, np.float32))
    init("tiny", np.array(1e-9, np.float32))
    init("norm_eps", np.array(1e-12, np.float32))

    # Positions 0..L-1 as a Slice of the table: ORT's optimizer rewrites Gather(table, Range)
    # into a Slice with a malformed starts tensor, so write the Slice ourselves.
    seq_len = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    init("zero1", np.array([0], np.int64))
    emb = node(
        "Add",
        [
            node(
                "Add",
                [
                    node("Gather", [w("embeddings.word_embeddings.weight"), "input_ids"], "e_word"),
                    node(
                        "Slice",
                        [w("embeddings.position_embeddings.weight"), "zero1", seq_len, "zero1"],
                        "e_pos",
                    ),
                ],
                "e_wp",
            ),
            node(
                "Gather", [w("embeddings.token_type_embeddings.weight"), "token_type_ids"], "e_type"
            ),
        ],
        "e_sum",
    )
    x = layer_norm(emb, "embeddings.LayerNorm", "x0")

    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    # Additive bias [B, 1, 1, L]: 0 for real tokens, -1e9 for padding.
    bias = node("Mul", [node("Sub", ["f_one", mask_f], "mask_inv"), "neg_big"], "mask_bias2")
    bias = node("Unsqueeze", [bias, init("axes12", np.array([1, 2], np.int64))], "mask_bias")

    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."

        def split_heads(y: str, name: str) -> str:
            r = node("Reshape", [y, "heads_shape"], name + "_r")
            return node("Transpose", [r], name + "_t", perm=[0, 2, 1, 3])

        q = split_heads(linear(x, p + "attention.self.query", f"l{i}_q"), f"l{i}_q")
        k = node(
            "Transpose",
            [
                node(
                    "Reshape",
                    [linear(x, p + "attention.self.key", f"l{i}_k"), "heads_shape"],
                    f"l{i}_k_r",
                )
            ],
            f"l{i}_k_t",
            perm=[0, 2, 3, 1],
        )
        v = split_heads(linear(x, p + "attention.self.value", f"l{i}_v"), f"l{i}_v")
        scores = node("Mul", [node("MatMul", [q, k], f"l{i}_qk"), "scale"], f"l{i}_qk_s")
        probs = node("Softmax", [node("Add", [scores, bias], f"l{i}_qk_m")], f"l{i}_p", axis=-1)
        ctx = node(
            "Transpose", [node("MatMul", [probs, v], f"l{i}_ctx")], f"l{i}_ctx_t", perm=[0, 2, 1, 3]
        )
        ctx = node("Reshape", [ctx, "hidden_shape"], f"l{i}_ctx_r")
        attn = linear(ctx, p + "attention.output.dense", f"l{i}_ao")
        x = layer_norm(
            node("Add", [x, attn], f"l{i}_res1"), p + "attention.output.LayerNorm", f"l{i}_x1"
        )
        inter = linear(x, p + "intermediate.dense", f"l{i}_ff1")
        # Exact erf GELU (BERT's "gelu"); ORT fuses this pattern into its Gelu kernel.
        gelu = node(
            "Mul",
            [
                node("Mul", [inter, init(f"l{i}_half", np.array(0.5, np.float32))], f"l{i}_half_x"),
                node(
                    "Add",
                    [
                        node(
                            "Erf",
                            [
                                node(
                                    "Div",
                                    [
                                        inter,
                                        init(f"l{i}_sqrt2", np.array(np.sqrt(2.0), np.float32)),
                                    ],
                                    f"l{i}_div",
                                )
                            ],
                            f"l{i}_erf",
                        ),
                        "f_one",
                    ],
                    f"l{i}_erf1",
                ),
            ],
            f"l{i}_gelu",
        )
        ff = linear(gelu, p + "output.dense", f"l{i}_ff2")
        x = layer_norm(node("Add", [x, ff], f"l{i}_res2"), p + "output.LayerNorm", f"l{i}_x2")

    m3 = node("Unsqueeze", [mask_f, init("axis_last", np.array([-1], np.int64))], "mask3")
    summed = node("ReduceSum", [node("Mul", [x, m3], "masked"), "axis1"], "summed", keepdims=0)
    count = node("Max", [node("ReduceSum", [m3, "axis1"], "count0", keepdims=0), "tiny"], "count")
    pooled = node("Div", [summed, count], "pooled")
    norm = node(
        "ReduceL2", [pooled, init("axis_m1", np.array([-1], np.int64))], "norm0", keepdims=1
    )
    node("Div", [pooled, node("Max", [norm, "norm_eps"], "norm")], "embeddings")

    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    out = [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", h])]
    graph = helper.make_graph(nodes, "bert_sentence_encoder", ints, out, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="irouter"
    )
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def export_encoder(source_dir: Path, out_dir: Path) -> tuple[Path, BertConfig]:
    """Write out_dir/model.onnx (weights inline: ~90 MB, under protobuf's 2 GB limit)."""
    cfg = BertConfig.from_json(source_dir / "config.json")
    model = build_encoder_model(load_bert_tensors(source_dir), cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    onnx.save_model(model, str(path))
    return path, cfg

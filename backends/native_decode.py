"""An int4 decoder's steps in the router's own kernels (backends._kernels.Q4Decoder).

ONNX Runtime's MatMulNBits and GroupQueryAttention took 34-41 ms for a 16-row decode step of
SmolLM2-135M on a 2-core AMD EPYC Zen 4 (OpenVINO's whole step: 18.6 ms); the native step reads
the same graph's int4 weights, computes what the graph computes (int8 activations per 32-block,
as MatMulNBits' accuracy level 4; rotate-half rotary; grouped-query attention reading each KV
head once for its query heads) and updates the same KV slot buffers in place: decode rows, and
(`prefill_graph: native`, auto where it decodes) prompt chunks, both in one call a step. Its
rounding differs from ONNX Runtime's, as ONNX Runtime's own kernels differ between CPUs; each
row's result depends only on that row, never on the batch or the thread count.

`decode_kernel`: 'native' (refused, by name, for a graph or CPU it cannot run), 'onnxruntime',
'auto': native where the CPU has AVX-512 VNNI or AVX2 and the graph is the int4 one it reads,
or a tile ('avx2', 'avx512-vnni', 'amx-int8'): native with that int4 matmul tile, refused where
the CPU lacks it ('amx-int8': the VNNI tile, and AMX tiles for rows in groups of 16, where the
CPU has AMX and Linux grants the process its tile state). Every tile computes the same bits.
'avx2' also pins the step's other vector code (float16 attention, KV stores, norms, SiLU,
activation quantization) to its AVX2 build, again the same bits; only the rotary embedding
keeps the clone the CPU loads.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from backends._kernels import Q4Decoder, q4_best_kernel
from backends.base import DECODE_KERNELS

logger = logging.getLogger(__name__)

TILES = ("avx2", "avx512-vnni", "amx-int8")
"""decode_kernel choices that pin the native step's tile (Q4Decoder's kernel names)."""

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""Each layer's MatMulNBits weights, in the order Q4Decoder takes them (the head comes last)."""


def native_copy_bytes(model_dir: Path, manifest: dict[str, Any], choice: str) -> int:
    """Resident bytes the native step adds where `choice` would load it (its copy of the graph's
    weights, re-laid out: about the size of the graph's files); 0 where the graph decodes."""
    if not native_will_decode(model_dir, manifest, choice):
        return 0
    return sum(p.stat().st_size for p in model_dir.glob("model.onnx*") if p.is_file())


def native_will_decode(model_dir: Path, manifest: dict[str, Any], choice: str) -> bool:
    """Whether load_native_decode would return the native step, as far as the manifest, the
    CPU and the graph (its nodes and weight names, not their values) tell."""
    if not native_decodes(manifest, choice):
        return False
    path = model_dir / "model.onnx"
    try:
        return _graph_checks(str(path), path.stat().st_mtime_ns, json.dumps(manifest)) is None
    except (OSError, DecodeError):  # no graph, or not one: the loader would fail on it too
        return False


@functools.lru_cache(maxsize=64)
def _graph_checks(path: str, mtime_ns: int, manifest: str) -> str | None:
    """_graph_problem of the graph at `path` (as of `mtime_ns`): read once, not per question."""
    graph = onnx.load(path, load_external_data=False)
    return _graph_problem(json.loads(manifest), graph)


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    if manifest.get("quantization") != "int4" or manifest.get("graph") != "gqa-shared-kv":
        return (
            f"the model is {manifest.get('quantization')!r} / {manifest.get('graph')!r}, not "
            "the int4 'gqa-shared-kv' graph"
        )
    if int(manifest.get("head_dim", 0)) != 64:
        return f"head_dim {manifest.get('head_dim')} is not 64"
    heads, kv_heads = int(manifest.get("num_heads", 0)), int(manifest.get("num_kv_heads", 0))
    if not kv_heads or heads % kv_heads or heads // kv_heads > 4:
        return f"{heads} query heads over {kv_heads} KV heads (up to 4 query heads a KV head)"
    if int(manifest.get("hidden_size", 0)) % 32 or int(manifest.get("vocab_size", 0)) % 16:
        return "hidden size or vocabulary not a multiple of 32 / 16"
    return None


def _graph_problem(manifest: dict[str, Any], graph: onnx.ModelProto) -> str | None:
    """Why the native step cannot compute this graph, or None."""
    problem = _manifest_problem(manifest)
    if problem:
        return problem
    nodes = {n.output[0]: n for n in graph.graph.node if n.output}
    for node in graph.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits" and (
            attrs.get("bits") != 4 or attrs.get("block_size") != 32 or len(node.input) > 3
        ):
            return f"{node.name} is not 4-bit, 32-block and symmetric"
        if node.op_type == "GroupQueryAttention" and (
            attrs.get("do_rotary") != 1
            or attrs.get("rotary_interleaved", 0) != 0
            or not np.isclose(attrs.get("scale", 0.0), 64**-0.5)
        ):
            return f"{node.name} is not rotate-half rotary attention scaled by head_dim ** -0.5"
    if "logits" not in nodes or nodes["logits"].op_type != "MatMulNBits":
        return "the LM head is not an int4 MatMulNBits"
    weights = {t.name for t in graph.graph.initializer}
    missing = [n for n in _weight_names(int(manifest["num_layers"])) if n not in weights]
    return f"the graph has no {missing[0]}" if missing else None


def _weight_names(layers: int) -> list[str]:
    """The initializers _build reads."""
    names = [f"l{i}.{p}" for i in range(layers) for p in PROJECTIONS] + ["lm_head"]
    return [
        *(n + suffix for n in names for suffix in (".weight_Q4", ".weight_scales")),
        *(f"l{i}.{n}" for i in range(layers) for n in ("attn_norm", "ffn_norm")),
        "final_norm",
        "embed_tokens",
        "cos_cache",
        "sin_cache",
    ]


def load_native_decode(
    model_dir: Path, manifest: dict[str, Any], choice: str, threads: int
) -> Q4Decoder | None:
    """The native decode step for the decoder in `model_dir`, or None where ONNX Runtime decodes
    (logged). Raises ValueError for an unknown choice, or 'native' or a tile where it cannot
    run."""
    if choice not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel={choice!r} is unknown; use one of {list(DECODE_KERNELS)}")
    if choice == "onnxruntime":
        return None
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    problem = _graph_problem(manifest, graph) or _cpu_problem(choice)
    if problem is None:
        try:
            decoder = _build(model_dir, manifest, graph, threads, choice if choice in TILES else "")
        except (KeyError, ValueError) as exc:  # a weight missing, a shape the kernels refuse
            problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        if choice != "auto":
            raise ValueError(f"decode_kernel={choice!r} cannot run {model_dir}: {problem}")
        logger.info("%s: ONNX Runtime decodes (%s)", manifest.get("name"), problem)
        return None
    logger.info(
        "%s: decode steps in the native int4 kernels (%s; decode_kernel: onnxruntime overrides)",
        manifest.get("name"),
        decoder.kernel,
    )
    return decoder


def _cpu_problem(choice: str) -> str | None:
    """Why this CPU cannot run the native step `choice` asks for, or None."""
    best = q4_best_kernel()
    if not best:
        return "this CPU has neither AVX-512 VNNI nor AVX2"
    if choice == "avx512-vnni" and best not in ("avx512-vnni", "amx-int8"):
        return "this CPU has no AVX-512 VNNI"
    if choice == "amx-int8" and best != "amx-int8":
        return "this CPU has no AMX int8 tiles, or Linux grants this process none"
    return None  # every CPU with a tile has the AVX2 one


def _build(
    model_dir: Path, manifest: dict[str, Any], graph: onnx.ModelProto, threads: int, tile: str
) -> Q4Decoder:
    """Q4Decoder over the graph's weights on `tile` ('' for the CPU's best; KeyError for a
    weight missing, ValueError for shapes the kernels refuse)."""
    onnx.load_external_data_for_model(graph, str(model_dir))
    weights = {t.name: t for t in graph.graph.initializer}

    def array(name: str, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(numpy_helper.to_array(weights[name]), dtype=dtype)

    layers = int(manifest["num_layers"])
    names = [f"l{i}.{p}" for i in range(layers) for p in PROJECTIONS] + ["lm_head"]
    norms = [
        array(f"l{i}.{n}", np.float32) for i in range(layers) for n in ("attn_norm", "ffn_norm")
    ]
    codes = [array(n + ".weight_Q4", np.uint8) for n in names]
    return Q4Decoder(
        layers=layers,
        hidden=int(manifest["hidden_size"]),
        heads=int(manifest["num_heads"]),
        kv_heads=int(manifest["num_kv_heads"]),
        head_dim=int(manifest["head_dim"]),
        intermediate=codes[3].shape[1] * 32,  # the down projection's K
        vocab=int(manifest["vocab_size"]),
        eps=_epsilon(graph),
        cos=array("cos_cache", np.float32),
        sin=array("sin_cache", np.float32),
        embedding=array("embed_tokens", np.float32),
        norms=np.stack([*norms, array("final_norm", np.float32)]),
        codes=codes,
        scales=[
            array(n + ".weight_scales", np.float32).reshape(c.shape[:2])
            for n, c in zip(names, codes, strict=True)
        ],
        threads=threads,
        kernel=tile,
    )


def _epsilon(graph: onnx.ModelProto) -> float:
    for node in graph.graph.node:
        if node.op_type.endswith("SimplifiedLayerNormalization"):
            for attr in node.attribute:
                if attr.name == "epsilon":
                    return float(attr.f)
    raise ValueError("the graph has no RMS norm to read its epsilon from")


def native_decodes(manifest: dict[str, Any], decode_kernel: str) -> bool:
    """Whether an OnnxDecoder with `decode_kernel` would run the native step for this model
    (from its manifest and the CPU; the graph's own check comes at load)."""
    return (
        decode_kernel != "onnxruntime"
        and not _cpu_problem(decode_kernel)
        and not _manifest_problem(manifest)
    )


NATIVE_PROMPTS = ("auto", "native")
"""prefill_graph choices under which prompts run in the native kernels where they decode."""


def native_every_step(
    model_dir: Path, manifest: dict[str, Any], decode_kernel: str, prefill_graph: str
) -> bool:
    """Whether an OnnxDecoder with these choices would compute prompts and decode steps in the
    native kernels (mixed_steps): neither graph loaded, float16 KV."""
    native_prompts = prefill_graph in NATIVE_PROMPTS
    return native_prompts and native_will_decode(model_dir, manifest, decode_kernel)


def kv_value_bytes(
    model_dir: Path, manifest: dict[str, Any], decode_kernel: str, prefill_graph: str
) -> int:
    """Bytes of one key or value element in an OnnxDecoder: 2 where the native kernels would
    compute every step (float16 KV), else 4 (float32, the graphs')."""
    return 2 if native_every_step(model_dir, manifest, decode_kernel, prefill_graph) else 4


class NativeSteps:
    """Q4Decoder over an OnnxDecoder's KV slot buffers: decode rows, and prompt chunks as rows of
    one slot at consecutive positions (`prefill_graph: native`). A token's keys, values and
    logits are the same bits whether it came in a prompt, however chunked, or was decoded."""

    def __init__(
        self, decoder: Q4Decoder, keys: list[np.ndarray], values: list[np.ndarray], vocab: int
    ) -> None:
        self.decoder = decoder
        self._keys = keys
        self._values = values
        self._vocab = vocab

    def _logits(self, rows: int) -> np.ndarray:
        """A call's logits, written by the step itself: a shared buffer copied out after each
        call cost a second 3 MB pass at 16 rows (~230 us a step on an Intel Xeon)."""
        return np.empty((rows, self._vocab), np.float32)

    def decode(self, slots: np.ndarray, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits = self._logits(slots.size)
        self.decoder.step(slots, ids, positions, self._keys, self._values, logits)
        return logits

    def prefill(
        self,
        slots: list[int],
        chunks: list[np.ndarray],
        starts: list[int],
        borrowed: dict[int, tuple[int, int]] | None = None,
    ) -> np.ndarray:
        """Each chunk's logits of its last token. `borrowed`: slot -> (slot, n), that slot's
        chunk reads positions 0..n-1 from the other slot."""
        sizes = np.array([c.size for c in chunks])
        rows = np.repeat(np.array(slots, np.int64), sizes)
        positions = np.concatenate(
            [np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, sizes, strict=True)]
        )
        last = np.cumsum(sizes, dtype=np.int64) - 1
        logits = self._logits(len(chunks))
        lenders = lengths = None
        if borrowed:
            pairs = [borrowed.get(slot, (-1, 0)) for slot in slots]
            lenders = np.repeat(np.array([p[0] for p in pairs], np.int64), sizes)
            lengths = np.repeat(np.array([p[1] for p in pairs], np.int64), sizes)
        self.decoder.step(
            rows,
            np.concatenate(chunks),
            positions,
            self._keys,
            self._values,
            logits,
            last,
            lenders,
            lengths,
        )
        return logits

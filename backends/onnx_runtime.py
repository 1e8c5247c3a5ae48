"""ONNX Runtime engines: a slot-based decoder with an in-place KV cache, and a sentence encoder.

KV cache design (measured, see FACTS.md and the tests): every layer owns one preallocated
NumPy buffer per K and V of shape [max_slots, kv_heads, max_context, head_dim]. The graph's
GroupQueryAttention receives the SAME OrtValue as past and present, so ORT writes the new
K/V in place at position seqlens_k and attends to positions <= seqlens_k only; nothing is
copied between steps and sequences of different lengths share a batch without padding.

* prefill runs one sequence at a time on the view buffer[slot:slot+1] (GQA with a past and
  S > 1 is only correct at batch 1);
* decode runs the rows 0..n-1 where n = max(slots) + 1. Rows in that range that are not in
  the batch get a dummy token written at their own current length: that position is beyond
  what the slot has computed, so it is never read before being overwritten.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from backends.artifact import encoder_inputs, read_manifest
from backends.base import PREFILL_GRAPHS, Capabilities, FloatArray, IntArray
from backends.cpu import int8_dot_flag

logger = logging.getLogger(__name__)


def _session(path: Path, threads: int, *, spin: bool = True) -> ort.InferenceSession:
    """`spin=False`: the threads stop spinning once a call ends (they spin during it)."""
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _touched(shape: tuple[int, ...]) -> FloatArray:
    """A zeroed float32 array whose pages are all resident (written, not only mapped)."""
    array = np.empty(shape, np.float32)
    array.fill(0.0)
    return array


def _expect_kind(manifest: dict[str, Any], kind: str, model_dir: Path) -> None:
    if manifest.get("kind") != kind:
        raise ValueError(
            f"{model_dir} holds a {manifest.get('kind')!r} model; this engine needs a {kind!r}"
        )


class _Binding:
    """An IOBinding whose inputs live in NumPy arrays we refill in place between runs."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.io = session.io_binding()
        # OrtValues over NumPy memory do not own it: keep each array alive while it is bound.
        self._keep: dict[str, tuple[npt.NDArray[Any], ort.OrtValue]] = {}

    def bind(self, name: str, array: npt.NDArray[Any], *, output: bool = False) -> ort.OrtValue:
        value = ort.OrtValue.ortvalue_from_numpy(array)
        self._keep[name] = (array, value)
        if output:
            self.io.bind_ortvalue_output(name, value)
        else:
            self.io.bind_ortvalue_input(name, value)
        return value


def _prefill_graph(manifest: dict[str, Any], model_dir: Path, prefill: str) -> Path | None:
    """The graph file that computes prompts, or None for the decoder's own (`prefill`: one of
    PREFILL_GRAPHS; 'auto' takes the int8 graph where the CPU multiplies int8 natively)."""
    if prefill not in PREFILL_GRAPHS:
        raise ValueError(f"prefill_graph={prefill!r} is unknown; use one of {list(PREFILL_GRAPHS)}")
    entry = manifest.get("prefill_graph")
    path = model_dir / str(entry["file"]) if isinstance(entry, dict) else None
    if prefill == "model":
        return None
    if path is None or not path.is_file():
        if prefill == "int8":
            raise ValueError(
                f"prefill_graph='int8': {model_dir} has no int8 prefill graph (an int4 decoder "
                "prepared by `irouter models prepare` has one); use 'model' or 'auto'"
            )
        return None
    flag = int8_dot_flag()
    if prefill == "auto" and flag is None:
        logger.info(
            "%s: prompts computed with the decoder's own graph (no VNNI or AMX on this CPU; "
            "prefill_graph: int8 overrides)",
            manifest.get("name"),
        )
        return None
    logger.info(
        "%s: prompts computed with the int8 graph %s (%s; prefill_graph: model overrides)",
        manifest.get("name"),
        path.name,
        f"the CPU has {flag}" if flag else "asked for",
    )
    return path


class OnnxDecoder:
    """DecoderStepEngine over a prepared decoder folder (model.onnx + manifest.json).

    Prompts may run through a second graph of the same model (`prefill_graph`; the int4 decoder's
    folder holds one at int8): on an AVX-512 VNNI AMD EPYC its prefill ran 1.7-1.9x the int4
    graph's. Each graph computes a row the same whatever else runs in its call, so an answer
    still does not depend on its batch, its chunks or the prefix cache; it does depend on which
    graph computed the prompt (the two are different approximations of the GGUF's weights).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        max_slots: int = 16,
        max_context: int = 2048,
        threads: int = 2,
        prefill_graph: str = "auto",
    ) -> None:
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        _expect_kind(manifest, "decoder", model_dir)
        limit = int(manifest["context_length"])
        if not 1 <= max_context <= limit:
            raise ValueError(
                f"max_context={max_context} must be in 1..{limit} (the model's context)"
            )
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots} must be >= 1")
        self.max_slots = max_slots
        self.max_context = max_context
        self.vocab_size = int(manifest["vocab_size"])
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=True,
            device="cpu",
            max_batch=max_slots,
            context_length=max_context,
        )
        graph = _prefill_graph(manifest, model_dir, prefill_graph)
        self.prefill_graph = "int8" if graph else "model"
        # With two sessions, each one's threads stop spinning when its call ends: left spinning,
        # they took the cores from the other session's call in the same step (8 decode rows
        # and a 100-token prompt: 107-146 ms a step, 74 ms with both stopping; AMD EPYC Zen 4).
        self._session = _session(model_dir / "model.onnx", threads, spin=graph is None)
        self._prefill_session = _session(graph, threads, spin=False) if graph else self._session
        self._num_layers = int(manifest["num_layers"])
        shape = (max_slots, int(manifest["num_kv_heads"]), max_context, int(manifest["head_dim"]))
        # GQA touches a slot's whole [kv_heads, max_context, head_dim] rows on first use
        # (measured), so every slot ends up resident: touched here, once, rather than lazily
        # (np.zeros) by the first request in each slot, which then waited for ~94 MB of page
        # faults (SmolLM2, 2,048 tokens): 50-120 ms per slot on these VMs, ~4 s for a first
        # burst of 16. Resident memory is the full budget from the start, logged below.
        self._keys = [_touched(shape) for _ in range(self._num_layers)]
        self._values = [_touched(shape) for _ in range(self._num_layers)]
        logger.info(
            "decoder %s: %d slots x %d tokens, KV cache %.0f MiB",
            manifest.get("name"),
            max_slots,
            max_context,
            2 * self._num_layers * self._keys[0].nbytes / 2**20,
        )
        self._lengths = np.zeros(max_slots, np.int64)
        """Tokens computed so far in each slot."""
        self._logits = np.zeros((max_slots, self.vocab_size), np.float32)
        self._ids = np.zeros((max_slots, 1), np.int64)
        self._seqlens = np.zeros(max_slots, np.int32)
        self._total = np.zeros((), np.int32)
        self._decode_bindings: dict[int, _Binding] = {}
        self._prefill_bindings: dict[int, _Binding] = {}
        self._lock = threading.Lock()
        self._pool_keys: list[FloatArray] = []
        self._pool_values: list[FloatArray] = []
        self._block_size = 0

    # ------------------------------------------------------------------ bindings
    def _bind_kv(self, binding: _Binding, lo: int, hi: int) -> None:
        for i in range(self._num_layers):
            for kind, buffers in (("key", self._keys), ("value", self._values)):
                # Same OrtValue as input and output: GQA then updates the cache in place.
                value = binding.bind(f"past_key_values.{i}.{kind}", buffers[i][lo:hi])
                binding.io.bind_ortvalue_output(f"present.{i}.{kind}", value)

    def _decode_binding(self, n: int) -> _Binding:
        binding = self._decode_bindings.get(n)
        if binding is None:
            binding = _Binding(self._session)
            binding.bind("input_ids", self._ids[:n])
            binding.bind("seqlens_k", self._seqlens[:n])
            binding.bind("total_sequence_length", self._total)
            binding.bind("logits", self._logits[:n], output=True)
            self._bind_kv(binding, 0, n)
            self._decode_bindings[n] = binding
        return binding

    def _prefill_binding(self, slot: int) -> _Binding:
        binding = self._prefill_bindings.get(slot)
        if binding is None:
            binding = _Binding(self._prefill_session)
            binding.bind("logits", self._logits[slot : slot + 1], output=True)
            self._bind_kv(binding, slot, slot + 1)
            self._prefill_bindings[slot] = binding
        return binding

    # ------------------------------------------------------------------ validation
    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot={slot} is out of range 0..{self.max_slots - 1}")
        return int(slot)

    def _check_ids(self, ids: npt.NDArray[Any], name: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"{name} holds token id {bad}, outside 0..{self.vocab_size - 1}")

    # ------------------------------------------------------------------ engine API
    def prefill(self, slot: int, token_ids: IntArray, start: int) -> FloatArray:
        slot = self._check_slot(slot)
        ids = np.ascontiguousarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D array, got shape {ids.shape}")
        self._check_ids(ids, "token_ids")
        end = start + ids.size
        if end > self.max_context:
            raise ValueError(
                f"prefill of {ids.size} tokens at start={start} reaches {end} tokens, beyond "
                f"max_context={self.max_context}"
            )
        with self._lock:
            if not 0 <= start <= self._lengths[slot]:
                raise ValueError(
                    f"start={start} must be in 0..{int(self._lengths[slot])} (tokens already "
                    f"computed in slot {slot})"
                )
            binding = self._prefill_binding(slot)
            ids2 = ids.reshape(1, -1)
            seqlens = np.array([end - 1], np.int32)
            total = np.array(end, np.int32)
            # Shapes vary per call, so these three are rebound; the KV and logits stay bound.
            binding.bind("input_ids", ids2)
            binding.bind("seqlens_k", seqlens)
            binding.bind("total_sequence_length", total)
            self._prefill_session.run_with_iobinding(binding.io)
            self._lengths[slot] = end
            out: FloatArray = self._logits[slot].copy()
            return out

    def decode(self, slots: IntArray, token_ids: IntArray, positions: IntArray) -> FloatArray:
        slots = np.asarray(slots, dtype=np.int64)
        ids = np.asarray(token_ids, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        if (
            slots.ndim != 1
            or slots.size == 0
            or ids.shape != slots.shape
            or pos.shape != slots.shape
        ):
            raise ValueError(
                f"slots, token_ids and positions must be equal-length non-empty 1-D arrays, got "
                f"shapes {slots.shape}, {ids.shape}, {pos.shape}"
            )
        for s in slots:
            self._check_slot(int(s))
        if np.unique(slots).size != slots.size:
            raise ValueError(f"slots={slots.tolist()} repeats a slot")
        self._check_ids(ids, "token_ids")
        if pos.min() < 0 or pos.max() >= self.max_context:
            bad = int(pos[(pos < 0) | (pos >= self.max_context)][0])
            raise ValueError(f"position {bad} is outside 0..{self.max_context - 1} (max_context)")
        with self._lock:
            ahead = pos > self._lengths[slots]
            if ahead.any():
                i = int(np.argmax(ahead))
                raise ValueError(
                    f"position {int(pos[i])} for slot {int(slots[i])} skips past its "
                    f"{int(self._lengths[slots[i]])} computed tokens"
                )
            n = int(slots.max()) + 1
            # Rows not in the batch: token 0 at the row's own length (never read before it is
            # overwritten). A full row writes its last position, which it can never attend again.
            self._ids[:n, 0] = 0
            self._seqlens[:n] = np.minimum(self._lengths[:n], self.max_context - 1)
            self._ids[slots, 0] = ids
            self._seqlens[slots] = pos
            self._total[()] = int(self._seqlens[:n].max()) + 1
            self._session.run_with_iobinding(self._decode_binding(n).io)
            self._lengths[slots] = pos + 1
            result: FloatArray = self._logits[slots]  # fancy indexing copies, in input row order
            return result

    def release(self, slot: int) -> None:
        slot = self._check_slot(slot)
        with self._lock:
            self._lengths[slot] = 0

    def slot_length(self, slot: int) -> int:
        """Tokens computed so far in `slot` (0 after release)."""
        return int(self._lengths[self._check_slot(slot)])

    # ------------------------------------------------------------------ prefix KV pool
    def kv_bytes_per_token(self) -> int:
        _, kv_heads, _, head_dim = self._keys[0].shape
        return int(2 * self._num_layers * kv_heads * head_dim * self._keys[0].itemsize)

    def open_pool(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        _, kv_heads, _, head_dim = self._keys[0].shape
        shape = (num_blocks, kv_heads, block_size, head_dim)
        with self._lock:
            # Touched now, so the pool's resident memory is its budget from the start instead
            # of growing as blocks are first written.
            self._pool_keys = [_touched(shape) for _ in range(self._num_layers)]
            self._pool_values = [_touched(shape) for _ in range(self._num_layers)]
            self._block_size = block_size

    def _check_block(self, block: int) -> int:
        if not self._pool_keys:
            raise ValueError("no prefix block pool: call open_pool first")
        if not 0 <= block < len(self._pool_keys[0]):
            raise ValueError(f"block={block} is out of range 0..{len(self._pool_keys[0]) - 1}")
        return int(block)

    def save_block(self, block: int, slot: int, start: int) -> None:
        slot, block, size = self._check_slot(slot), self._check_block(block), self._block_size
        with self._lock:
            if not 0 <= start <= self._lengths[slot] - size:
                raise ValueError(
                    f"positions {start}..{start + size} of slot {slot} are not all computed "
                    f"({int(self._lengths[slot])} are)"
                )
            for i in range(self._num_layers):
                self._pool_keys[i][block] = self._keys[i][slot, :, start : start + size]
                self._pool_values[i][block] = self._values[i][slot, :, start : start + size]

    def load_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        slot = self._check_slot(slot)
        for block in blocks:
            self._check_block(block)
        n = len(blocks) * self._block_size
        if n > self.max_context:
            raise ValueError(f"{len(blocks)} blocks hold {n} tokens, beyond max_context")
        index = np.asarray(blocks, dtype=np.int64)
        _, kv_heads, _, head_dim = self._keys[0].shape
        shape = (kv_heads, len(blocks), self._block_size, head_dim)
        with self._lock:
            for i in range(self._num_layers):
                for pool, cache in (
                    (self._pool_keys, self._keys),
                    (self._pool_values, self._values),
                ):
                    # One copy into a [heads, blocks, size, dim] view of the slot's positions
                    # (reshaping the transposed gather first copied twice: ~10x slower).
                    np.copyto(
                        cache[i][slot, :, :n].reshape(shape), pool[i][index].transpose(1, 0, 2, 3)
                    )
            self._lengths[slot] = n


class OnnxEncoder:
    """EncoderEngine over a prepared encoder folder (model.onnx + manifest.json)."""

    def __init__(self, model_dir: Path, *, threads: int = 2, max_batch: int = 64) -> None:
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        _expect_kind(manifest, "encoder", model_dir)
        self.dim = int(manifest["embedding_dim"])
        self.max_length = int(manifest["max_length"])
        self.capabilities = Capabilities(
            generate=False,
            embed=True,
            stream=False,
            device="cpu",
            max_batch=max_batch,
            context_length=self.max_length,
        )
        self._session = _session(model_dir / "model.onnx", threads)

    def encode(self, input_ids: IntArray, attention_mask: IntArray) -> FloatArray:
        out = self._session.run(
            ["embeddings"], encoder_inputs(input_ids, attention_mask, self.max_length)
        )
        result: FloatArray = out[0]
        return result

"""ONNX Runtime engines: a slot-based decoder with an in-place KV cache, and a sentence encoder.

KV cache design (measured, see FACTS.md and the tests): every layer owns one preallocated
NumPy buffer per K and V of shape [max_slots, kv_heads, max_context, head_dim]. The graph's
GroupQueryAttention receives the SAME OrtValue as past and present, so ORT writes the new
K/V in place at position seqlens_k and attends to positions <= seqlens_k only; nothing is
copied between steps and sequences of different lengths share a batch without padding.

* prompts run through the packed int8 graph, several slots a call (backends.packed_prefill),
  where the CPU multiplies int8 natively; else through the decoder's own graph one slot at a
  time on the view buffer[slot:slot+1] (GQA with a past and S > 1 is only correct at batch 1);
* decode runs in the native int4 kernels where they can (backends.native_decode: the batch's
  rows only), else through the graph on rows 0..n-1 where n = max(slots) + 1. Rows in that
  range that are not in the batch get a dummy token written at their own current length: that
  position is beyond what the slot has computed, so it is never read before being overwritten.
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

from backends import native_decode
from backends.artifact import encoder_inputs, read_manifest
from backends.base import Capabilities, FloatArray, IntArray
from backends.kv_pool import SlotKVPool, touched
from backends.packed_prefill import PackedPrefill, packed_groups
from backends.prompt_graphs import prompt_graph

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


class OnnxDecoder(SlotKVPool):
    """DecoderStepEngine over a prepared decoder folder (model.onnx + manifest.json).

    Decode steps, and then prompts, run in the native int4 kernels where they can
    (`decode_kernel`, `prefill_graph: native`; backends.native_decode). Otherwise prompts may
    run through a second graph of the same model (`prefill_graph`; the int4 decoder's
    folder holds one at int8, several prompts a call): on an AVX-512 VNNI AMD EPYC its prefill
    ran 1.7-1.9x the int4 graph's. Each graph computes a row the same whatever else runs in its
    call, so an answer does not depend on its batch or the prefix cache (the packed int8 graph
    computes a prompt the same however it was chunked, bit for bit; the int4 graph's kernels
    round a one-row call differently from a longer one, which the router's runner never makes
    for a prompt); it does depend on which graph computed the prompt.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        max_slots: int = 16,
        max_context: int = 2048,
        threads: int = 2,
        prefill_graph: str = "auto",
        decode_kernel: str = "auto",
    ) -> None:
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        _expect_kind(manifest, "decoder", model_dir)
        limit = int(manifest["context_length"])
        if not 1 <= max_context <= limit:
            raise ValueError(f"max_context={max_context} must be in 1..{limit} (model context)")
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
        native = native_decode.load_native_decode(model_dir, manifest, decode_kernel, threads)
        self.decode_kernel = "native" if native else "onnxruntime"
        if prefill_graph == "native" and native is None:
            raise ValueError(
                f"prefill_graph='native' computes prompts in the native decode kernels, which "
                f"do not run here (decode_kernel={decode_kernel!r}; see the log)"
            )
        # Prompts in the kernels that decode: one pass over the weights for a step's decode
        # rows and prompt chunks (mixed_steps), every token computed alike.
        self.mixed_steps = native is not None and prefill_graph in native_decode.NATIVE_PROMPTS
        graph = None if self.mixed_steps else prompt_graph(manifest, model_dir, prefill_graph)
        self.prefill_graph = "native" if self.mixed_steps else "int8" if graph else "model"
        # None where the native kernels compute every step. With two sessions (or the native
        # step's threads), each one's threads stop spinning when its call ends: left spinning,
        # they took the cores from the other's call in the same step (8 decode rows and a
        # 100-token prompt: 107-146 ms a step, 74 ms with both stopping; AMD EPYC Zen 4).
        spin = graph is None and native is None
        model = None if self.mixed_steps else _session(model_dir / "model.onnx", threads, spin=spin)
        self._session = model
        self._num_layers = int(manifest["num_layers"])
        shape = (max_slots, int(manifest["num_kv_heads"]), max_context, int(manifest["head_dim"]))
        # Touched once here, not by each slot's first request (~94 MB of page faults, 50-120 ms a
        # slot for SmolLM2 at 2,048 tokens). float16 where the native kernels compute every step
        # (llama.cpp's default for KV): half the memory and of long contexts' attention reads.
        kv = np.float16 if self.mixed_steps else np.float32
        self._keys = [touched(shape, kv) for _ in range(self._num_layers)]
        self._values = [touched(shape, kv) for _ in range(self._num_layers)]
        self._packed: PackedPrefill | None = None
        if graph is not None:
            group = int(manifest["num_heads"]) // int(manifest["num_kv_heads"])
            packed = _session(graph, threads, spin=False)
            self._packed = PackedPrefill(packed, self._keys, self._values, group)
        logger.info(
            "decoder %s: %d slots x %d tokens, KV cache %.0f MiB (%s)",
            manifest.get("name"),
            max_slots,
            max_context,
            2 * self._num_layers * self._keys[0].nbytes / 2**20,
            self._keys[0].dtype,
        )
        self._lengths = np.zeros(max_slots, np.int64)
        """Tokens computed so far in each slot."""
        self._logits = np.zeros((max_slots, self.vocab_size), np.float32)
        self._native = (
            native_decode.NativeSteps(native, self._keys, self._values, self.vocab_size)
            if native
            else None
        )
        self._ids = np.zeros((max_slots, 1), np.int64)
        self._seqlens = np.zeros(max_slots, np.int32)
        self._total = np.zeros((), np.int32)
        self._decode_bindings: dict[int, _Binding] = {}
        self._prefill_bindings: dict[int, _Binding] = {}
        self._lock = threading.Lock()
        self._init_pool()

    # ------------------------------------------------------------------ bindings
    @property
    def _graph(self) -> ort.InferenceSession:
        assert self._session is not None, "the native kernels compute every step (mixed_steps)"
        return self._session

    def _bind_kv(self, binding: _Binding, lo: int, hi: int) -> None:
        for i in range(self._num_layers):
            for kind, buffers in (("key", self._keys), ("value", self._values)):
                # Same OrtValue as input and output: GQA then updates the cache in place.
                value = binding.bind(f"past_key_values.{i}.{kind}", buffers[i][lo:hi])
                binding.io.bind_ortvalue_output(f"present.{i}.{kind}", value)

    def _decode_binding(self, n: int) -> _Binding:
        binding = self._decode_bindings.get(n)
        if binding is None:
            binding = _Binding(self._graph)
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
            binding = _Binding(self._graph)
            binding.bind("logits", self._logits[slot : slot + 1], output=True)
            self._bind_kv(binding, slot, slot + 1)
            self._prefill_bindings[slot] = binding
        return binding

    # ------------------------------------------------------------------ validation
    def _check_ids(self, ids: npt.NDArray[Any], name: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"{name} holds token id {bad}, outside 0..{self.vocab_size - 1}")

    # ------------------------------------------------------------------ engine API
    def prefill(self, slot: int, token_ids: IntArray, start: int) -> FloatArray:
        logits: FloatArray = self.prefill_batch([slot], [token_ids], [start])[0]
        return logits

    @property
    def borrows_prefixes(self) -> bool:
        """Prompt chunks may read their prefix from another slot (PrefixBorrowing): where the
        native kernels compute every step."""
        return self.mixed_steps

    def prefill_batch(
        self,
        slots: Sequence[int],
        chunks: Sequence[IntArray],
        starts: Sequence[int],
        prefixes: Sequence[tuple[int, int] | None] | None = None,
    ) -> FloatArray:
        """prefill for each row, in one call of the packed int8 graph where it computes the
        prompts (each row's result as alone); else one call a row. `prefixes`: see
        backends.base.PrefixBorrowing (native kernels only)."""
        if not len(slots) == len(chunks) == len(starts) or len(slots) == 0:
            raise ValueError(
                f"slots, chunks and starts must be equal-length and non-empty, got "
                f"{len(slots)}, {len(chunks)}, {len(starts)}"
            )
        rows = [int(self._check_slot(slot)) for slot in slots]
        if len(set(rows)) != len(rows):
            raise ValueError(f"slots={rows} repeats a slot")
        ids = [
            self._check_chunk(chunk, int(start))
            for chunk, start in zip(chunks, starts, strict=True)
        ]
        firsts = [int(start) for start in starts]
        with self._lock:
            self._settle()
            self._check_settled(rows, firsts)
            ends = [start + chunk.size for start, chunk in zip(firsts, ids, strict=True)]
            borrowed = self._borrowings(rows, firsts, ends, prefixes, self.mixed_steps)
            for slot, start in zip(rows, firsts, strict=True):
                if not 0 <= start <= self._lengths[slot] and slot not in borrowed:
                    raise ValueError(
                        f"start={start} must be in 0..{int(self._lengths[slot])} (tokens already "
                        f"computed in slot {slot})"
                    )
            shared = [
                self._shared_blocks(slot, start) for slot, start in zip(rows, firsts, strict=True)
            ]
            if self.mixed_steps:
                assert self._native is not None
                logits = self._native.prefill(rows, ids, firsts, borrowed)
            elif self._packed is not None:
                logits = np.empty((len(rows), self.vocab_size), np.float32)
                for group in packed_groups([c.size for c in ids], firsts):
                    logits[group] = self._packed.run(
                        [rows[r] for r in group],
                        [ids[r] for r in group],
                        [firsts[r] for r in group],
                        [shared[r] for r in group],
                        self._block_size,
                    )
            else:
                logits = np.stack(
                    [self._prefill_gqa(*row) for row in zip(rows, ids, firsts, strict=True)]
                )
            for slot, chunk, start in zip(rows, ids, firsts, strict=True):
                self._lengths[slot] = start + chunk.size
            self._lent(borrowed)
            return logits

    def _check_chunk(self, token_ids: IntArray, start: int) -> npt.NDArray[np.int64]:
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
        return ids

    def _prefill_gqa(self, slot: int, ids: npt.NDArray[np.int64], start: int) -> FloatArray:
        """One slot's chunk through a GroupQueryAttention graph, in place in the slot."""
        binding = self._prefill_binding(slot)
        end = start + ids.size
        # Shapes vary per call, so these three are rebound; the KV and logits stay bound.
        binding.bind("input_ids", ids.reshape(1, -1))
        binding.bind("seqlens_k", np.array([end - 1], np.int32))
        binding.bind("total_sequence_length", np.array(end, np.int32))
        self._graph.run_with_iobinding(binding.io)
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
            self._settle()
            self._check_settled(slots)
            ahead = pos > self._lengths[slots]
            if ahead.any():
                i = int(np.argmax(ahead))
                raise ValueError(
                    f"position {int(pos[i])} for slot {int(slots[i])} skips past its "
                    f"{int(self._lengths[slots[i]])} computed tokens"
                )
            if self._native is not None:
                result: FloatArray = self._native.decode(slots, ids, pos)
            else:
                result = self._decode_graph(slots, ids, pos)
            self._lengths[slots] = pos + 1
            if self._loaded:
                for slot, position in zip(slots.tolist(), pos.tolist(), strict=True):
                    self._forget_from(slot, position)
            return result

    def _decode_graph(
        self, slots: npt.NDArray[np.int64], ids: npt.NDArray[np.int64], pos: npt.NDArray[np.int64]
    ) -> FloatArray:
        """decode through the graph: rows 0..max(slots), logits in input row order."""
        n = int(slots.max()) + 1
        # Rows not in the batch: token 0 at the row's own length (never read before it is
        # overwritten). A full row writes its last position, which it can never attend again.
        self._ids[:n, 0] = 0
        self._seqlens[:n] = np.minimum(self._lengths[:n], self.max_context - 1)
        self._ids[slots, 0] = ids
        self._seqlens[slots] = pos
        self._total[()] = int(self._seqlens[:n].max()) + 1
        self._graph.run_with_iobinding(self._decode_binding(n).io)
        result: FloatArray = self._logits[slots]  # fancy indexing copies, in input row order
        return result

    def release(self, slot: int) -> None:
        slot = self._check_slot(slot)
        with self._lock:
            self._lengths[slot] = 0
            self._loaded.pop(slot, None)
            self._unsettled.discard(slot)
            self._borrowed.pop(slot, None)  # its prefix is not needed any more (a lender's is)

    def slot_length(self, slot: int) -> int:
        """Tokens computed so far in `slot` (0 after release)."""
        return int(self._lengths[self._check_slot(slot)])


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

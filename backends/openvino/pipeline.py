"""SmolLM2 on OpenVINO GenAI's ContinuousBatchingPipeline: a request engine (backends.base).

Why a request engine and not a step engine: the pipeline keeps the KV cache in paged blocks
and batches prefill chunks with decode rows itself; driven through `add_request`/`step` it
reached 4.8x aggregate throughput at 16 streams where our batched ONNX Runtime loop reached
2.3x (FACTS.md). The router therefore hands it whole requests and only streams the tokens.

One dedicated thread owns the pipeline: it drains an inbox (new requests, cancellations), runs
`step()`, reads every handle, and hands all of the step's chunks to the event loop in one
`call_soon_threadsafe`. A request whose iterator is closed is cancelled through its handle;
the pipeline frees its blocks at the next step.

Weights, precision and the IR cache are in backends/openvino/ir.py: precision='f32' reads
losslessly re-encoded weights and computes in f32 with an f32 KV cache, and then reproduces the
fp32 ONNX model's greedy tokens; the default reads GenAI's own (lossy) Q4_1 mapping.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from backends.artifact import read_manifest
from backends.base import (
    Capabilities,
    GenerationChunk,
    GenerationRequest,
    StepObserver,
    UnsupportedParameter,
)
from backends.openvino.engine import check_device, check_precision, compile_properties
from backends.openvino.ir import load_pipeline

logger = logging.getLogger(__name__)

BURST_GAP_S = 0.003
"""Woken from idle, the engine waits this long for another call before its first step..."""
BURST_WINDOW_S = 0.025
"""...and at most this long in all (see OpenVinoGenerator._gather_burst)."""
HANDOFF_WAIT_S = 0.02
"""Longest wait after a step for the event loop to pass its tokens on (see _hand_off)."""
HANDOFF_HOPS = 3
"""Event-loop iterations the engine lets run after a step's tokens are queued."""
KV_BLOCK_TOKENS = 32
"""Tokens per KV block on CPU (sizes the cache for max_slots sequences of max_context)."""

_FINISHED = {
    ov_genai.GenerationStatus.FINISHED,
    ov_genai.GenerationStatus.STOP,
    ov_genai.GenerationStatus.CANCEL,
    ov_genai.GenerationStatus.IGNORED,
}


# ---- the engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Add:
    key: int
    request_id: str
    input_ids: ov.Tensor
    config: ov_genai.GenerationConfig
    watch: frozenset[int]
    """Stop tokens this thread must enforce: GenAI ignores stop_token_ids under ignore_eos."""


_Message = _Add | int  # an int cancels that key


class OpenVinoGenerator:
    """RequestEngine over a prepared decoder folder (its manifest, tokenizer-free)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        gguf_path: Path | None = None,
        device: str = "CPU",
        precision: str = "",
        threads: int = 2,
        max_slots: int = 16,
        max_context: int = 2048,
        token_budget: int = 256,
        prefix_cache_mb: int = 0,
        observer: StepObserver | None = None,
    ) -> None:
        """`prefix_cache_mb`: KV kept beyond the slots' for GenAI's prefix caching (requests
        sharing a prefix reuse its blocks); 0 turns it off."""
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        if manifest.get("kind") != "decoder":
            raise ValueError(
                f"{model_dir} holds a {manifest.get('kind')!r} model; this engine needs a 'decoder'"
            )
        limit = int(manifest["context_length"])
        if not 1 <= max_context <= limit:
            raise ValueError(
                f"max_context={max_context} must be in 1..{limit} (the model's context)"
            )
        if max_slots < 1 or token_budget < 1:
            raise ValueError(f"max_slots={max_slots} and token_budget={token_budget} must be >= 1")
        self.device = check_device(device)
        self.precision = check_precision(precision)
        self.max_slots = max_slots
        self.max_context = max_context
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_token_id = int(manifest["eos_token_id"])
        self.stop_token_ids = frozenset(int(i) for i in manifest["stop_token_ids"])
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=True,
            device=device,
            max_batch=max_slots,
            context_length=max_context,
        )
        exact = precision == "f32"
        props = compile_properties(precision, threads)
        if exact:
            # The CPU plugin otherwise keeps the KV cache in u8 and quantizes activations
            # feeding int4/int8 weights: both change the numbers.
            props |= {"KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        scheduler = ov_genai.SchedulerConfig()
        scheduler.max_num_seqs = max_slots
        scheduler.max_num_batched_tokens = max(token_budget, max_slots)
        scheduler.dynamic_split_fuse = True
        scheduler.num_kv_blocks = max_slots * -(-max_context // KV_BLOCK_TOKENS)
        if prefix_cache_mb > 0:
            # Blocks of finished requests stay cached (LRU) in the pool: more blocks hold them.
            per_token = 2 * int(manifest["num_layers"]) * int(manifest["num_kv_heads"])
            per_token *= int(manifest["head_dim"]) * (4 if exact else 1)  # f32, else u8 KV
            extra = (prefix_cache_mb << 20) // (per_token * KV_BLOCK_TOKENS)
            scheduler.num_kv_blocks += extra
            scheduler.enable_prefix_caching = True
        started = time.perf_counter()
        self._pipe = load_pipeline(
            model_dir,
            gguf_path,
            exact=exact,
            scheduler=scheduler,
            device=self.device,
            properties=props,
        )
        logger.info(
            "decoder %s on OpenVINO GenAI %s: %d sequences x %d tokens, %s, loaded in %.1fs",
            manifest.get("name"),
            device,
            max_slots,
            max_context,
            props,
            time.perf_counter() - started,
        )
        self._observer = observer
        # Loop side.
        self._queues: dict[int, asyncio.Queue[GenerationChunk | BaseException]] = {}
        self._keys = 0
        # Engine-thread side.
        self._inbox: collections.deque[_Message] = collections.deque()
        self._handles: dict[int, tuple[str, Any, frozenset[int]]] = {}
        self._wake = threading.Event()
        self._handed = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- loop side ---------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return len(self._handles) + len(self._inbox)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="openvino-genai", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def generation_config(self, request: GenerationRequest) -> ov_genai.GenerationConfig:
        """The request's GenerationConfig; UnsupportedParameter names a field GenAI would not
        honour as the router means it."""
        checks: Sequence[tuple[str, float, float]] = (
            ("temperature", request.temperature, 0.0),
            ("top_p", request.top_p, 1e-9),
            ("repetition_penalty", request.repetition_penalty, 1e-9),
        )
        for name, value, low in checks:
            if not value >= low:
                raise UnsupportedParameter(name, f"{name}={value:g} must be >= {low:g}")
        if not 0 < request.top_p <= 1:
            raise UnsupportedParameter("top_p", f"top_p={request.top_p:g} must be in (0, 1]")
        if not 0 <= request.min_p <= 1:
            raise UnsupportedParameter("min_p", f"min_p={request.min_p:g} must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = float(getattr(request, name))
            if not -2 <= value <= 2:
                raise UnsupportedParameter(name, f"{name}={value:g} must be in [-2, 2]")
        if request.top_k < 0:
            raise UnsupportedParameter("top_k", f"top_k={request.top_k} must be >= 0")
        if request.max_tokens < 1:
            raise UnsupportedParameter(
                "max_tokens", f"max_tokens={request.max_tokens} must be >= 1"
            )
        if request.seed < 0:
            raise UnsupportedParameter("seed", f"seed={request.seed} must be >= 0")
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = request.max_tokens
        if request.temperature > 0:
            config.do_sample = True
            config.temperature = request.temperature
            config.top_p = request.top_p
            if request.top_k:
                config.top_k = request.top_k
            config.min_p = request.min_p
            config.rng_seed = request.seed
        else:
            config.do_sample = False
        config.repetition_penalty = request.repetition_penalty
        config.presence_penalty = request.presence_penalty
        config.frequency_penalty = request.frequency_penalty
        config.set_eos_token_id(self.eos_token_id)
        stops = set(request.stop_token_ids)
        if not request.ignore_eos:
            stops |= self.stop_token_ids
        config.stop_token_ids = stops | {self.eos_token_id}
        config.ignore_eos = request.ignore_eos
        try:
            config.validate()
        except RuntimeError as exc:
            raise ValueError(f"OpenVINO GenAI refused the sampling parameters: {exc}") from None
        return config

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not request.prompt_ids:
            raise ValueError("prompt_ids is empty")
        if len(request.prompt_ids) + request.max_tokens > self.max_context:
            raise UnsupportedParameter(
                "max_tokens",
                f"{len(request.prompt_ids)} prompt tokens + max_tokens={request.max_tokens} "
                f"exceed max_context={self.max_context}",
            )
        config = self.generation_config(request)
        ids = ov.Tensor(np.asarray([request.prompt_ids], dtype=np.int64))
        self._keys += 1
        key = self._keys
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self._queues[key] = queue
        watch = frozenset(request.stop_token_ids) if request.ignore_eos else frozenset()
        self._inbox.append(_Add(key, request.request_id, ids, config, watch))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(key, None)
            if not finished:
                self._inbox.append(key)
                self._wake.set()

    def _deliver(self, out: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        for key, item in out:
            queue = self._queues.get(key)
            if queue is not None:
                queue.put_nowait(item)
        self._after_hops(HANDOFF_HOPS)

    def _after_hops(self, hops: int) -> None:
        """Tell the engine thread once the loop has run `hops` more iterations: each hop runs
        what the last one scheduled (the consumers woken by the queued chunks, then their
        writes to the callers)."""
        if hops == 0:
            self._handed.set()
        else:
            assert self._loop is not None
            self._loop.call_soon(self._after_hops, hops - 1)

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            out: list[tuple[int, GenerationChunk | BaseException]] = []
            self._drain_inbox(out)
            if not self._handles and not self._pipe.has_non_finished_requests():
                self._flush(out)
                # Idle: the gauges say so now, not at the next request's first step.
                if self._observer is not None:
                    self._observer.on_step(0, 0, 0, 0.0)
                self._wake.wait()
                self._wake.clear()
                self._gather_burst()
                continue
            started = time.perf_counter()
            batch = len(self._handles)
            try:
                self._pipe.step()
                self._read_outputs(out)
            except Exception:  # a failing step fails what is running; the engine keeps serving
                logger.exception("OpenVINO GenAI step failed; failing its %d requests", batch)
                for key, (_, handle, _) in list(self._handles.items()):
                    handle.cancel()
                    out.append((key, RuntimeError("the OpenVINO GenAI step failed")))
                self._handles.clear()
            self._hand_off(out)
            if self._observer is not None:
                metrics = self._pipe.get_metrics()
                running = int(metrics.scheduled_requests)
                waiting = max(0, int(metrics.requests) - running)
                self._observer.on_step(batch, waiting, running, time.perf_counter() - started)
        for _, handle, _ in self._handles.values():
            handle.cancel()
        self._handles.clear()

    def _gather_burst(self) -> None:
        """Woken from idle: let the rest of a burst arrive before the first step. Calls that
        come together reach this thread a few ms apart (each is parsed and tokenized on the
        event loop first); stepping at once would prefill the first alone while the others wait
        out that step, and GenAI then took seconds longer to reach their first tokens (16 calls
        at once, AMD EPYC: TTFT median 2.0 s, 0.70 s with the burst gathered). A lone call waits
        BURST_GAP_S."""
        deadline = time.monotonic() + BURST_WINDOW_S
        while time.monotonic() < deadline and self._wake.wait(BURST_GAP_S):
            self._wake.clear()

    def _hand_off(self, out: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        """Queue a step's chunks on the loop and wait (HANDOFF_WAIT_S at most) until it has
        passed them on. GenAI's step() holds the GIL for the whole step (measured: a Python
        thread ticking every ms ran once during a 480 ms step), so the loop cannot run during
        it: without this wait a step's first tokens reached their callers only after the next
        step (at 16 streams, TTFT 1 step ~ 1 s late)."""
        if not out:
            return
        self._handed.clear()
        self._flush(out)
        self._handed.wait(HANDOFF_WAIT_S)

    def _flush(self, out: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        if out and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, out)

    def _drain_inbox(self, out: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        while self._inbox:
            message = self._inbox.popleft()
            if isinstance(message, int):
                entry = self._handles.pop(message, None)
                if entry is not None:
                    logger.debug("request %s cancelled", entry[0])
                    entry[1].cancel()
                continue
            try:
                handle = self._pipe.add_request(message.key, message.input_ids, message.config)
            except Exception as exc:
                logger.exception("request %s: add_request failed", message.request_id)
                out.append((message.key, RuntimeError(f"OpenVINO GenAI refused it: {exc}")))
                continue
            self._handles[message.key] = (message.request_id, handle, message.watch)

    def _read_outputs(self, out: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        for key, (request_id, handle, watch) in list(self._handles.items()):
            tokens: list[int] = []
            reason = None
            while handle.can_read():
                for output in handle.read().values():
                    tokens.extend(output.generated_ids)
                    if output.finish_reason == ov_genai.GenerationFinishReason.LENGTH:
                        reason = "length"
                    elif output.finish_reason == ov_genai.GenerationFinishReason.STOP:
                        reason = "stop"
            status = handle.get_status()
            if status == ov_genai.GenerationStatus.IGNORED:
                del self._handles[key]
                out.append(
                    (key, RuntimeError("OpenVINO GenAI ignored the request (KV cache too small)"))
                )
                continue
            hit = next((i for i, t in enumerate(tokens) if t in watch), -1) if watch else -1
            if hit >= 0:
                del tokens[hit + 1 :]
                reason = "stop"
                handle.cancel()  # its blocks are freed at the next step
            elif status in _FINISHED and reason is None:
                reason = "stop"  # finished without a reason on its outputs: treat as an end
            if reason is not None:
                del self._handles[key]
                logger.debug("request %s finished (%s)", request_id, reason)
            if tokens or reason is not None:
                out.append((key, GenerationChunk(tuple(tokens), None, reason)))

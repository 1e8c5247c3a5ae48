"""SmolLM2 on OpenVINO GenAI's ContinuousBatchingPipeline: a request engine (backends.base).

Why a request engine and not a step engine: the pipeline keeps the KV cache in paged blocks
and batches prefill chunks with decode rows itself; driven through `add_request`/`step` it
reached 4.8x aggregate throughput at 16 streams where our batched ONNX Runtime loop reached
2.3x (FACTS.md). The router therefore hands it whole requests and only streams the tokens.

The pipeline runs in a worker process of its own (worker.py: its step() holds the GIL for the
whole step, which stopped this process's event loop). Requests and cancellations go to it over
a pipe, written by the thread that sends them (pipe_writer.py); one thread here receives each
step's tokens and hands them to the event loop in one `call_soon_threadsafe`. A request whose
iterator is closed is cancelled in the worker; the pipeline frees its blocks at the next step.
A worker that dies fails the calls in flight and is started again (after RESTART_DELAYS_S):
calls made meanwhile are refused, naming why.

Weights, precision and the IR cache are in backends/openvino/ir.py: precision='f32' reads
losslessly re-encoded weights and computes in f32 with an f32 KV cache, and then reproduces the
fp32 ONNX model's greedy tokens; the default reads GenAI's own (lossy) Q4_1 mapping.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from backends.artifact import read_manifest
from backends.base import (
    Capabilities,
    GenerationChunk,
    GenerationRequest,
    StepObserver,
    UnsupportedParameter,
)
from backends.openvino import worker
from backends.openvino.engine import check_device, check_precision, compile_properties
from backends.openvino.pipe_writer import PipeWriter

logger = logging.getLogger(__name__)

KV_BLOCK_TOKENS = 32
"""Tokens per KV block on CPU (sizes the cache for max_slots sequences of max_context)."""
STOP_WAIT_S = 10.0
"""How long stop() waits for the worker to exit before killing it."""
STOPPED = "the OpenVINO GenAI engine is stopped"
RESTART_DELAYS_S = (0.5, 2.0, 5.0, 10.0, 30.0)
"""Waits before each try to start a dead worker again; the last repeats."""


# ---- the engine -------------------------------------------------------------------------------


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
        scheduler: dict[str, Any] = {
            "max_num_seqs": max_slots,
            "max_num_batched_tokens": max(token_budget, max_slots),
            "dynamic_split_fuse": True,
            "num_kv_blocks": max_slots * -(-max_context // KV_BLOCK_TOKENS),
        }
        if prefix_cache_mb > 0:
            # Blocks of finished requests stay cached (LRU) in the pool: more blocks hold them.
            per_token = 2 * int(manifest["num_layers"]) * int(manifest["num_kv_heads"])
            per_token *= int(manifest["head_dim"]) * (4 if exact else 1)  # f32, else u8 KV
            extra = (prefix_cache_mb << 20) // (per_token * KV_BLOCK_TOKENS)
            scheduler["num_kv_blocks"] += extra
            scheduler["enable_prefix_caching"] = True
        self._setup = setup = worker.Setup(
            model_dir=str(model_dir),
            gguf_path=str(gguf_path) if gguf_path else None,
            exact=exact,
            device=self.device,
            properties=props,
            scheduler=scheduler,
        )
        started = time.perf_counter()
        self._process, to_worker, self._from_worker = _spawn(setup)
        self._to_worker = PipeWriter(to_worker)
        logger.info(
            "decoder %s on OpenVINO GenAI %s (worker process %d): %d sequences x %d tokens, %s, "
            "loaded in %.1fs",
            manifest.get("name"),
            device,
            self._process.pid,
            max_slots,
            max_context,
            props,
            time.perf_counter() - started,
        )
        self._observer = observer
        # Loop side.
        self._queues: dict[int, asyncio.Queue[GenerationChunk | BaseException]] = {}
        """Each call in flight (num_active), by the key the worker knows it by."""
        self._keys = 0
        self.worker_idle = True
        """The worker said it has nothing left to step (set by the receiving thread)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broken = ""
        """Why calls are refused now (the worker died, is starting again or was stopped)."""
        self._stopped = threading.Event()
        self._swap = threading.Lock()
        """Held while a new worker replaces a dead one, and by stop()."""
        self.restarts = 0

    # ---- loop side ---------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._receive, name="openvino-genai", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker (killed if it has not exited within STOP_WAIT_S) and the threads."""
        with self._swap:  # no new worker after this (a restart under way gives up)
            self._stopped.set()
        self._send(None)  # the worker's stop
        self._process.join(STOP_WAIT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_S)
        self._thread = None
        self._to_worker.close()
        self._from_worker.close()

    def generation_config(self, request: GenerationRequest) -> dict[str, Any]:
        """The request's GenerationConfig fields (worker.build_config), checked by GenAI too;
        UnsupportedParameter names a field GenAI would not honour as the router means it."""
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
        fields: dict[str, Any] = {"max_new_tokens": request.max_tokens}
        if request.temperature > 0:
            fields |= {"do_sample": True, "temperature": request.temperature}
            fields |= {"top_p": request.top_p, "min_p": request.min_p, "rng_seed": request.seed}
            if request.top_k:
                fields["top_k"] = request.top_k
        else:
            fields["do_sample"] = False
        fields["repetition_penalty"] = request.repetition_penalty
        fields["presence_penalty"] = request.presence_penalty
        fields["frequency_penalty"] = request.frequency_penalty
        stops = set(request.stop_token_ids)
        if not request.ignore_eos:
            stops |= self.stop_token_ids
        fields["stop_token_ids"] = stops | {self.eos_token_id}
        fields["ignore_eos"] = request.ignore_eos
        fields["eos_token_id"] = self.eos_token_id
        worker.build_config(dict(fields))  # ValueError now, not in the worker
        return fields

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
        if self._broken:
            raise RuntimeError(self._broken)
        self._keys += 1
        key = self._keys
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self._queues[key] = queue
        watch = frozenset(request.stop_token_ids) if request.ignore_eos else frozenset()
        self.worker_idle = False
        self._send(worker.Add(key, tuple(request.prompt_ids), config, watch))
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
                logger.debug("request %s cancelled", request.request_id)
                self._send(key)

    def _send(self, message: worker.Add | int | None) -> None:
        # To the current worker (a new one after a restart); one that is gone drops it: the
        # receiving thread says why and starts another.
        self._to_worker.send(message)

    def _deliver(self, out: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        for key, item in out:
            queue = self._queues.get(key)
            if queue is not None:
                queue.put_nowait(item)

    # ---- receiving thread --------------------------------------------------------------------

    def _receive(self) -> None:
        """Each step's tokens from the worker, handed to the loop; when the worker dies, every
        call in flight fails, and calls are refused until a new worker is ready."""
        while True:
            self._receive_steps()
            code = self._process.exitcode
            self._broken = (
                STOPPED
                if self._stopped.is_set()
                else f"the OpenVINO GenAI worker exited (code {code}); starting it again"
            )
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, self._broken)
            if self._stopped.is_set() or not self._restart(code):
                self._broken = STOPPED
                return

    def _restart(self, code: int | None) -> bool:
        """A new worker in place of the dead one, tried after each of RESTART_DELAYS_S; False
        when stop() came first."""
        logger.error("OpenVINO GenAI worker %d exited (code %s)", self._process.pid, code)
        tries = 0
        while not self._stopped.wait(RESTART_DELAYS_S[min(tries, len(RESTART_DELAYS_S) - 1)]):
            tries += 1
            try:
                process, to_worker, from_worker = _spawn(self._setup)
            except RuntimeError as exc:
                logger.error("OpenVINO GenAI worker: starting it again failed: %s", exc)
                continue
            with self._swap:
                if self._stopped.is_set():  # stop() ran meanwhile: this one is not wanted
                    to_worker.send(None)  # (blocking: it reads its pipe until it exits)
                    process.join(STOP_WAIT_S)
                    process.kill()
                    to_worker.close()
                    from_worker.close()
                    return False
                old = (self._to_worker, self._from_worker)
                self._process, self._from_worker = process, from_worker
                self._to_worker = PipeWriter(to_worker)
                old[0].close()
                old[1].close()
                self.restarts += 1
                self._broken = ""
            logger.warning("OpenVINO GenAI worker started again (process %d)", process.pid)
            return True
        return False

    def _receive_steps(self) -> None:
        """The current worker's messages until it exits."""
        while True:
            try:
                message = self._from_worker.recv()
            except (EOFError, OSError):
                break
            if message[0] == "idle":
                # (An idle sent just before the worker read a new request is not idle.)
                self.worker_idle = not self._queues
                if self._observer is not None:
                    self._observer.on_step(0, 0, 0, 0.0)  # the gauges say idle now
                continue
            _, outputs, batch, waiting, running, seconds = message
            out: list[tuple[int, GenerationChunk | BaseException]] = []
            for key, tokens, reason, error in outputs:
                if key not in self._queues and reason is None and not error:
                    # No call waits for it (cancelled while its tokens were on the way): stop
                    # it there.
                    self._send(key)
                if error:
                    out.append((key, RuntimeError(error)))
                else:
                    out.append((key, GenerationChunk(tokens, None, reason)))
            self._flush(out)
            if self._observer is not None and batch:
                self._observer.on_step(batch, waiting, running, seconds)
        self._process.join(STOP_WAIT_S)  # its exit code
        if self._process.is_alive():  # closed its pipe yet did not exit: no use any more
            self._process.kill()
            self._process.join()

    def _fail_all(self, why: str) -> None:
        for key in list(self._queues):
            self._queues[key].put_nowait(RuntimeError(why))

    def _flush(self, out: list[tuple[int, GenerationChunk | BaseException]]) -> None:
        if out and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, out)


def _spawn(setup: worker.Setup) -> tuple[Any, Connection, Connection]:
    """The worker process, started and loaded (RuntimeError naming what its load raised)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    to_read, to_worker = context.Pipe(duplex=False)
    from_worker, to_write = context.Pipe(duplex=False)
    process = context.Process(
        target=worker.main, args=(setup, to_read, to_write), name="openvino-genai", daemon=True
    )
    process.start()
    to_read.close()
    to_write.close()
    try:
        kind, detail = from_worker.recv()
    except EOFError:
        kind, detail = "exited", ""
    if kind != "ready":
        process.join()
        to_worker.close()
        from_worker.close()
        if kind == "exited":
            raise RuntimeError(
                f"the OpenVINO GenAI worker exited while loading (code {process.exitcode})"
            )
        raise RuntimeError(f"OpenVINO GenAI could not load the model: {detail}")
    return process, to_worker, from_worker

"""The decoder engine: a thread that runs schedule → execute → update over a step engine.

The event loop never runs a model. Calls submit a `Request` and read `Chunk`s from an asyncio
queue; the engine thread owns the native scheduler, the backend and every Request after submission.
Each step hands all of its chunks to the loop in one `call_soon_threadsafe`, so the cross-thread
cost is per step, not per token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from backends.base import DecoderStepEngine
from router import _native
from router.errors import Internal, ResourceExhausted, RouterError
from router.scheduler.detokenizer import Detokenizer, TokenDecoder
from router.scheduler.request import Request, RequestStatus

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one step produced for one request."""

    token_ids: tuple[int, ...]
    text: str
    status: RequestStatus
    error: RouterError | None = None
    tokens: int = -1
    """Tokens this chunk stands for; -1: len(token_ids). Engines that stream text only (remote
    servers) set it, so usage and quotas still count what was generated."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.tokens < 0 else self.tokens


@dataclass(frozen=True)
class EngineLimits:
    max_slots: int
    token_budget: int
    max_waiting: int
    max_context: int


class StepObserver(Protocol):
    def on_step(self, batch_size: int, waiting: int, running: int, seconds: float) -> None: ...


class GenerationEngine(Protocol):
    """What serving needs of a decoder, whichever kind of backend is behind it: DecoderEngine
    (the router batches a step engine) or RequestEngineAdapter (the backend batches)."""

    name: str

    def start(self) -> None:
        """On the event loop that will call generate."""
        ...

    def stop(self) -> None: ...

    @property
    def num_unfinished(self) -> int:
        """Calls waiting on this engine (loop side)."""
        ...

    @property
    def num_active(self) -> int:
        """Requests the backend holds."""
        ...

    def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Chunks until one is finished; closing the iterator cancels the request."""
        ...

    @property
    def last_output_at(self) -> float:
        """time.monotonic() when a chunk last reached a caller (0: never): proof of life for a
        health check that a busy backend is too slow to answer."""
        ...

    async def ready(self, timeout_s: float | None = None) -> bool:
        """Health probe: whether a call made now could be served (never raises); a probe that
        waits on a backend waits at most timeout_s (None: the backend's own default)."""
        ...


class _NullObserver:
    def on_step(self, batch_size: int, waiting: int, running: int, seconds: float) -> None:
        return None


class DecoderEngine:
    def __init__(
        self,
        name: str,
        backend: DecoderStepEngine,
        decoder: TokenDecoder,
        limits: EngineLimits,
        stop_ids: Sequence[int],
        observer: StepObserver | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self._backend = backend
        self._decoder = decoder
        self._stop_ids = frozenset(stop_ids)
        self._observer = observer or _NullObserver()
        self._sched = _native.Scheduler(
            max_slots=limits.max_slots,
            token_budget=limits.token_budget,
            # Everything admitted on the loop side waits here until its first step, so the
            # native queue must hold running + waiting; the loop-side check sheds load first.
            max_waiting=limits.max_waiting + limits.max_slots,
            max_context=limits.max_context,
        )
        # Loop side: requests submitted and not yet fully delivered.
        self._live: dict[int, asyncio.Queue[Chunk]] = {}
        # Engine-thread side.
        self._inbox: collections.deque[tuple[str, Request | int]] = collections.deque()
        self._by_id: dict[int, Request] = {}
        self._detok: dict[int, Detokenizer] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_output_at = 0.0

    # ---- loop side -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    @property
    def last_output_at(self) -> float:
        return self._last_output_at

    async def ready(self, timeout_s: float | None = None) -> bool:
        return not self._stopping and self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def num_unfinished(self) -> int:
        """Calls waiting on this engine (loop side)."""
        return len(self._live)

    @property
    def num_active(self) -> int:
        """Requests the engine thread holds (each owns or awaits a slot)."""
        return len(self._by_id)

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Yield chunks until the request finishes. Closing the iterator early (client gone,
        deadline passed) cancels the request; its slot is freed within one step."""
        if len(self._live) >= self.limits.max_slots + self.limits.max_waiting:
            raise ResourceExhausted(
                f"model {self.name!r} has {len(self._live)} requests in flight, its limit "
                f"(max_slots {self.limits.max_slots} + max_waiting {self.limits.max_waiting}); "
                "retry shortly",
                retry_after_s=1.0,
            )
        queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._live[request.engine_id] = queue
        self._inbox.append(("add", request))
        self._wake.set()
        finished = False
        try:
            while True:
                chunk = await queue.get()
                if chunk.error is not None:
                    finished = True
                    raise chunk.error
                finished = chunk.status.is_finished
                yield chunk
                if finished:
                    return
        finally:
            self._live.pop(request.engine_id, None)
            if not finished:
                self._inbox.append(("abort", request.engine_id))
                self._wake.set()

    def _deliver(self, chunks: list[tuple[int, Chunk]]) -> None:
        self._last_output_at = time.monotonic()
        for engine_id, chunk in chunks:
            queue = self._live.get(engine_id)
            if queue is not None:
                queue.put_nowait(chunk)

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            out: list[tuple[int, Chunk]] = []
            self._drain_inbox(out)
            if not self._sched.has_unfinished():
                self._flush(out)
                # Idle (the last request finished or was cancelled): the gauges say so now, not
                # at the next request's first step.
                self._observer.on_step(0, 0, 0, 0.0)
                self._wake.wait()
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                batch = self._step(out)
            except Exception:  # a bug in the loop itself: fail what is running, keep serving
                logger.exception("engine %s: step failed; failing its requests", self.name)
                batch = 0
                for engine_id in list(self._by_id):
                    self._fail(engine_id, Internal(f"model {self.name!r} failed a step"), out)
            self._flush(out)
            self._observer.on_step(
                batch,
                self._sched.num_waiting,
                self._sched.num_running,
                time.perf_counter() - started,
            )

    def _flush(self, out: list[tuple[int, Chunk]]) -> None:
        if out and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, out)

    def _drain_inbox(self, out: list[tuple[int, Chunk]]) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                assert isinstance(item, Request)
                self._add(item, out)
            else:
                assert isinstance(item, int)
                self._finish(item, RequestStatus.FINISHED_CANCELLED)

    def _add(self, req: Request, out: list[tuple[int, Chunk]]) -> None:
        try:
            admitted = self._sched.add_request(
                request_id=req.engine_id,
                num_prompt_tokens=req.num_prompt,
                max_new_tokens=req.params.max_tokens,
                priority=int(req.priority),
            )
        except ValueError as exc:  # validated before submission; this is a bug if it happens
            out.append((req.engine_id, _error_chunk(Internal(str(exc)))))
            return
        if not admitted:
            error = ResourceExhausted(
                f"model {self.name!r} queue is full ({self.limits.max_waiting} waiting); "
                "retry shortly"
            )
            out.append((req.engine_id, _error_chunk(error)))
            return
        self._by_id[req.engine_id] = req
        self._detok[req.engine_id] = Detokenizer(self._decoder, req.params.stop)

    def _finish(self, engine_id: int, status: RequestStatus) -> Request | None:
        req = self._by_id.pop(engine_id, None)
        self._detok.pop(engine_id, None)
        self._sched.finish_requests([engine_id])
        if req is None:
            return None
        req.status = status
        if req.slot >= 0:
            self._backend.release(req.slot)
            req.slot = -1
        return req

    def _fail(self, engine_id: int, error: RouterError, out: list[tuple[int, Chunk]]) -> None:
        self._finish(engine_id, RequestStatus.FINISHED_ERROR)
        out.append((engine_id, _error_chunk(error)))

    def _step(self, out: list[tuple[int, Chunk]]) -> int:
        plan = self._sched.schedule()
        for engine_id in plan.preempted:
            req = self._by_id.get(int(engine_id))
            if req is not None:
                req.status = RequestStatus.PREEMPTED
                req.slot = -1
        ids: IntArray = plan.request_ids
        if len(ids) == 0:
            return 0
        slots = plan.slots
        starts = plan.starts
        counts = plan.counts
        sample = plan.sample
        reqs = [self._by_id[int(i)] for i in ids]
        for req, slot in zip(reqs, slots, strict=True):
            req.slot = int(slot)
            req.status = RequestStatus.RUNNING

        logits_by_row: dict[int, FloatArray] = {}
        decode_rows = np.flatnonzero(counts == 1)
        if len(decode_rows):
            logits = self._decode(reqs, decode_rows, slots, starts, out)
            for k, row in enumerate(decode_rows):
                if logits[k] is not None:
                    logits_by_row[int(row)] = logits[k]  # type: ignore[assignment]
        for row in np.flatnonzero(counts > 1):
            req = reqs[row]
            start, count = int(starts[row]), int(counts[row])
            try:
                last = self._backend.prefill(
                    int(slots[row]), req.tokens[start : start + count], start
                )
            except Exception:
                logger.exception("engine %s: prefill failed for %s", self.name, req.request_id)
                self._fail(req.engine_id, Internal("prefill failed for this request"), out)
                continue
            logits_by_row[int(row)] = last

        rows = [int(r) for r in np.flatnonzero(sample) if int(r) in logits_by_row]
        if rows:
            self._sample_and_update([reqs[r] for r in rows], [logits_by_row[r] for r in rows], out)
        return len(ids)

    def _decode(
        self,
        reqs: list[Request],
        rows: npt.NDArray[np.intp],
        slots: npt.NDArray[np.int32],
        starts: npt.NDArray[np.int32],
        out: list[tuple[int, Chunk]],
    ) -> list[FloatArray | None]:
        row_slots = slots[rows].astype(np.int64)
        positions = starts[rows].astype(np.int64)
        tokens = np.fromiter(
            (reqs[r].tokens[starts[r]] for r in rows), dtype=np.int64, count=len(rows)
        )
        try:
            logits = self._backend.decode(row_slots, tokens, positions)
            return list(logits)
        except Exception:
            if len(rows) == 1:
                req = reqs[int(rows[0])]
                logger.exception("engine %s: decode failed for %s", self.name, req.request_id)
                self._fail(req.engine_id, Internal("decode failed for this request"), out)
                return [None]
            # Find the culprit: one failing request must fail alone, not its whole batch.
            logger.warning("engine %s: batched decode failed; retrying rows alone", self.name)
            return [
                self._decode(reqs, rows[k : k + 1], slots, starts, out)[0] for k in range(len(rows))
            ]

    def _sample_and_update(
        self, reqs: list[Request], logits: list[FloatArray], out: list[tuple[int, Chunk]]
    ) -> None:
        n = len(reqs)
        stacked = np.ascontiguousarray(np.stack(logits), dtype=np.float32)
        p = [r.params for r in reqs]
        lengths = np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        history = np.concatenate([r.tokens[: r.num_tokens] for r in reqs])
        tokens = _native.sample(
            logits=stacked,
            temperature=np.array([x.temperature for x in p], dtype=np.float32),
            top_k=np.array([x.top_k for x in p], dtype=np.int32),
            top_p=np.array([x.top_p for x in p], dtype=np.float32),
            min_p=np.array([x.min_p for x in p], dtype=np.float32),
            repetition_penalty=np.array([x.repetition_penalty for x in p], dtype=np.float32),
            presence_penalty=np.array([x.presence_penalty for x in p], dtype=np.float32),
            frequency_penalty=np.array([x.frequency_penalty for x in p], dtype=np.float32),
            seeds=np.array([r.seed for r in reqs], dtype=np.uint64),
            tokens=history,
            offsets=offsets,
            prompt_lens=np.array([r.num_prompt for r in reqs], dtype=np.int64),
        )
        appended: list[int] = []
        for req, token in zip(reqs, tokens.tolist(), strict=True):
            req.append(token)
            status = RequestStatus.RUNNING
            text = ""
            if (
                token in self._stop_ids and not req.params.ignore_eos
            ) or token in req.params.stop_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            else:
                text, hit_stop = self._detok[req.engine_id].add(token)
                if hit_stop:
                    status = RequestStatus.FINISHED_STOPPED
            if not status.is_finished and req.num_output >= req.params.max_tokens:
                status = RequestStatus.FINISHED_LENGTH
            if status.is_finished:
                # Text held back only because it might have begun a stop string is released.
                text += self._detok[req.engine_id].flush()
                self._finish(req.engine_id, status)
            else:
                appended.append(req.engine_id)
            out.append((req.engine_id, Chunk((token,), text, status)))
        if appended:
            self._sched.append_tokens(np.array(appended, dtype=np.int64))


def _error_chunk(error: RouterError) -> Chunk:
    return Chunk((), "", RequestStatus.FINISHED_ERROR, error)

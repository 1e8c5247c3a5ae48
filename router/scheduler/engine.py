"""The decoder engine: a thread that runs schedule → execute → update over a step engine.

The event loop never runs a model. Calls submit a `Request` and read `Chunk`s from an asyncio
queue; the engine thread owns the scheduler (scheduler.py), the runner (runner.py) and every
Request after submission. Each step hands all of its chunks to the loop in one
`call_soon_threadsafe`, so the cross-thread cost is per step, not per token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np

from backends.base import DecoderStepEngine, PrefixKVStore, StepObserver, gather_burst
from router.errors import Internal
from router.scheduler.admission import Admission
from router.scheduler.detokenizer import TokenDecoder
from router.scheduler.generation import Chunk, EngineLimits, error_chunk
from router.scheduler.pacing import StepPacer
from router.scheduler.prefix_cache import BLOCK_TOKENS, PrefixCache
from router.scheduler.request import Priority, Request, RequestStatus
from router.scheduler.runner import ModelRunner
from router.scheduler.scheduler import Out, Scheduler

logger = logging.getLogger(__name__)

FILL_AFTER_S = 0.05
"""Idle this long before computing finished replies: a client that sends its next call at once
(an agent's tool loop) gains nothing from them and would wait for a chunk (~3% of one stream's
throughput in back-to-back calls of 128 tokens)."""

FILL_TOKENS = 16
"""Tokens of a finished reply computed again per idle step (scheduler.ReplyFill), four cache
blocks: a request arriving meanwhile waits for one such chunk (32 tokens took 34-110 ms after
pasts of up to 2,000 tokens on 2 AVX-512 cores, the int8 graph)."""


class _NullObserver:
    def on_step(self, batch_size: int, waiting: int, running: int, seconds: float) -> None:
        return None

    def on_prefix_cache(self, hit_tokens: int, prompt_tokens: int) -> None:
        return None

    def on_reply_fill(self, tokens: int) -> None:
        return None


def _prefix_cache(name: str, backend: DecoderStepEngine, budget: int) -> PrefixCache | None:
    """The prefix cache within `budget` bytes, when the backend can keep KV blocks."""
    if budget <= 0 or not isinstance(backend, PrefixKVStore):
        return None
    num_blocks = budget // (backend.kv_bytes_per_token() * BLOCK_TOKENS)
    if num_blocks < 1:
        logger.warning("engine %s: prefix_cache_mb holds no block of KV; prefix cache off", name)
        return None
    backend.open_pool(num_blocks, BLOCK_TOKENS)
    logger.info(
        "engine %s: prefix cache of %d blocks x %d tokens (%.0f MiB)",
        name,
        num_blocks,
        BLOCK_TOKENS,
        num_blocks * BLOCK_TOKENS * backend.kv_bytes_per_token() / 2**20,
    )
    return PrefixCache(backend, num_blocks)


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
        self._observer = observer or _NullObserver()
        # Loop side: requests submitted and not yet fully delivered, and who may join them.
        self._live: dict[int, asyncio.Queue[Chunk]] = {}
        self._admission = Admission(name, limits)
        # Engine-thread side.
        self.prefix_cache = _prefix_cache(name, backend, limits.prefix_cache_bytes)
        self._scheduler = Scheduler(name, limits, decoder, stop_ids, self.prefix_cache)
        self._runner = ModelRunner(name, backend, self.prefix_cache)
        self._scheduler.decode_is_prefill = self._runner.mixed_steps
        self._scheduler.borrow_prefixes = self._runner.borrows_prefixes
        self._pacer = StepPacer(limits.token_budget)
        self._inbox: collections.deque[tuple[str, Request | int]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_output_at = 0.0
        self._filling = False
        """Computing finished replies since the engine went idle (FILL_AFTER_S has passed)."""

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

    def check_admission(self, priority: Priority) -> None:
        self._admission.check(priority)

    @property
    def pending_fills(self) -> int:
        """Finished replies not yet computed into the prefix cache (engine thread's count)."""
        return self._scheduler.pending_fills

    @property
    def num_active(self) -> int:
        """Requests the engine thread holds (each owns or awaits a slot)."""
        return len(self._scheduler.requests)

    @property
    def structured_output(self) -> str:
        """The runner masks each constrained row (router.structured.masks)."""
        return "router"

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Yield chunks until the request finishes. Closing the iterator early (client gone,
        deadline passed) cancels the request; its slot is freed within one step."""
        self._admission.admit(request.priority)
        queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._live[request.engine_id] = queue
        self._inbox.append(("add", request))
        self._wake.set()
        finished = False
        computed = False  # a chunk came: the request held a slot (what admission counts)
        try:
            while True:
                if computed or not self.limits.max_wait_s:
                    chunk = await queue.get()
                else:
                    chunk = await self._first(queue, request)
                if chunk.error is not None:
                    finished = True
                    raise chunk.error
                if not computed and request.slot_at:
                    self._admission.first_token(time.monotonic() - request.slot_at)
                computed = True
                finished = chunk.status.is_finished
                yield chunk
                if finished:
                    return
        finally:
            self._admission.depart(request.priority, held_slot=computed)
            self._live.pop(request.engine_id, None)
            if not finished:
                self._inbox.append(("abort", request.engine_id))
                self._wake.set()

    async def _first(self, queue: asyncio.Queue[Chunk], request: Request) -> Chunk:
        """The first chunk, or ResourceExhausted when the request is still waiting for a slot
        after admission's slot_wait_s: the bound holds even where the expected wait was unknown
        (a burst before any rate was measured) or wrong. A request that has its slot (in
        prefill), or is held while another computes the prefix they share, is left to finish."""
        wait_s = self._admission.slot_wait_s
        try:
            return await asyncio.wait_for(queue.get(), wait_s)
        except TimeoutError:
            if request.status is not RequestStatus.WAITING or request.held:
                return await queue.get()
        raise self._admission.timed_out(request.priority)

    def _deliver(self, chunks: list[tuple[int, Chunk]]) -> None:
        self._last_output_at = time.monotonic()
        for engine_id, chunk in chunks:
            queue = self._live.get(engine_id)
            if queue is not None:
                queue.put_nowait(chunk)

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        scheduler, runner, pacer = self._scheduler, self._runner, self._pacer
        reported = (0, 0)  # prefix cache (hit, queried) tokens the observer has been told of
        while not self._stopping:
            out: Out = []
            self._drain_inbox(out)
            scheduler.release_held(out)
            if not scheduler.has_unfinished():
                self._flush(out)
                out = []
                if self._idle_fill():  # a finished reply chunk into the prefix cache, or a call
                    continue
                runner.release(scheduler.take_freed_slots())
                self._flush(out)
                # Idle (the last request finished or was cancelled): the gauges say so now, not
                # at the next request's first step.
                self._observer.on_step(0, 0, 0, 0.0)
                self._wake.wait()
                self._gather_burst()
                continue
            self._filling = False
            started = time.perf_counter()
            batch = 0
            try:
                # Sequences still in their prompt take no decode row: counted as decoding, their
                # share went to the prefill and paced steps ran long (3.2 decode steps, not 3).
                decoding, fresh = scheduler.decoding()
                budget = pacer.budget(decoding, scheduler.num_running, fresh)
                step = scheduler.schedule(budget)
                batch = len(step.requests)
                result = runner.execute(step)
                counts = step.plan.counts
                decode_rows = int(np.count_nonzero(counts == 1))
                pacer.observe(
                    decode_rows, int(counts.sum()) - decode_rows, time.perf_counter() - started
                )
                out += scheduler.update_from_output(step, result)
            except Exception:  # a bug in the loop itself: fail what is running, keep serving
                logger.exception("engine %s: step failed; failing its requests", self.name)
                scheduler.fail_all(Internal(f"model {self.name!r} failed a step"), out)
            self._flush(out)
            try:  # after the tokens went out: prefixes read from other slots into their own
                runner.settle()
            except Exception:  # the backend copies them before its next use of those slots
                logger.exception("engine %s: copying shared prefixes failed", self.name)
            self._observer.on_step(
                batch, scheduler.num_waiting, scheduler.num_running, time.perf_counter() - started
            )
            cache = self.prefix_cache
            if cache is not None and cache.queried_tokens != reported[1]:
                self._observer.on_prefix_cache(
                    cache.hit_tokens - reported[0], cache.queried_tokens - reported[1]
                )
                reported = (cache.hit_tokens, cache.queried_tokens)

    def _idle_fill(self) -> bool:
        """Idle with finished replies to cache: after FILL_AFTER_S with no call, compute one
        chunk. False when there is none to compute; True when a chunk ran or a call came (the
        rest of its burst gathered with it)."""
        if not self._scheduler.pending_fills:
            return False
        if not self._filling:
            self._filling = True
            self._wake.clear()
            if not self._inbox:
                self._wake.wait(FILL_AFTER_S)
        if not self._inbox:
            self._fill()
        if self._inbox:
            self._gather_burst()
        return True

    def _fill(self) -> bool:
        """Compute one chunk of a finished reply into the prefix cache (scheduler.ReplyFill);
        False when there is none. A failure is logged and drops every pending reply: nothing
        waits on them."""
        scheduler = self._scheduler
        try:
            fill = scheduler.next_fill(FILL_TOKENS)
            if fill is None:
                return False
            self._runner.fill(fill[0].slot, fill[0].tokens, fill[1], fill[2])
            self._observer.on_reply_fill(fill[2] - fill[1])
        except Exception:
            logger.exception(
                "engine %s: computing a finished reply for the cache failed", self.name
            )
            scheduler.drop_fills()
        return True

    def _gather_burst(self) -> None:
        """Woken from idle: the rest of a burst joins the first step (backends.base)."""
        self._wake.clear()

        def arrived(timeout: float) -> bool:
            if not self._wake.wait(timeout):
                return False
            self._wake.clear()
            return True

        gather_burst(arrived)

    def _flush(self, out: Out) -> None:
        if out and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, out)

    def _drain_inbox(self, out: Out) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                assert isinstance(item, Request)
                error = self._scheduler.add_request(item)
                if error is not None:
                    out.append((item.engine_id, error_chunk(error)))
            else:
                assert isinstance(item, int)
                self._scheduler.finish_requests([item], RequestStatus.FINISHED_CANCELLED)

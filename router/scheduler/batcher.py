"""Dynamic batching for encoders: calls that arrive close together share one forward pass.

A batch closes when it holds `max_batch` texts, or when `max_delay` has passed since its first
text and the encoder is free. One batch runs while the next fills, so under load the queue turns
into bigger batches instead of a backlog of small ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from router import _native
from router.errors import Internal

logger = logging.getLogger(__name__)


class Encoder(Protocol):
    def encode(
        self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]: ...


class BatchObserver(Protocol):
    def on_batch(self, texts: int, seconds: float) -> None: ...


@dataclass(eq=False)
class _Pending:
    ids: list[list[int]]
    future: asyncio.Future[npt.NDArray[np.float32]]
    enqueued: float = field(default_factory=time.perf_counter)
    solo: bool = False  # set after its batch failed: runs alone to find the bad call


class EncoderBatcher:
    def __init__(
        self,
        name: str,
        encoder: Encoder,
        *,
        max_batch: int,
        max_delay_s: float,
        pad_id: int = 0,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.max_batch = max_batch
        self._encoder = encoder
        self._max_delay = max_delay_s
        self._pad_id = pad_id
        self._observer = observer
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"enc-{name}")
        # One batch runs while the next one fills; it closes when the encoder is free again.
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._waiting = 0

    @property
    def num_pending(self) -> int:
        """Embed calls waiting for their vectors (queued or in a running batch)."""
        return self._waiting

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._collect(), name=f"batch-{self.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def embed(self, ids: list[list[int]]) -> npt.NDArray[np.float32]:
        """Embed already tokenized texts (at most max_batch); returns [len(ids), dim]."""
        future: asyncio.Future[npt.NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(ids, future))
        self._waiting += 1
        try:
            return await future
        finally:
            self._waiting -= 1

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Pending | None = None
        while True:
            first = carry or await self._queue.get()
            carry = None
            batch = [first]
            size = len(first.ids)
            deadline = loop.time() + self._max_delay
            while size < self.max_batch and not first.solo:
                item = await self._next(deadline)
                if item is None:
                    break
                if item.solo or size + len(item.ids) > self.max_batch:
                    carry = item  # never split a call across batches
                    break
                batch.append(item)
                size += len(item.ids)
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            await self._idle.wait()
            self._idle.clear()
            run = loop.run_in_executor(self._executor, self._run_batch, batch)
            run.add_done_callback(functools.partial(self._resolve, batch=batch))

    async def _next(self, deadline: float) -> _Pending | None:
        """The next call for the batch being filled, or None when the batch should close: after
        max_delay if the encoder is idle, else as soon as it becomes idle."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        loop = asyncio.get_running_loop()
        timeout = deadline - loop.time()
        if timeout > 0:
            try:
                return await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                pass
        if self._idle.is_set():
            return None
        getter = loop.create_task(self._queue.get())
        idle = loop.create_task(self._idle.wait())
        await asyncio.wait((getter, idle), return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    def _run_batch(self, batch: Sequence[_Pending]) -> npt.NDArray[np.float32]:
        started = time.perf_counter()
        rows = [row for p in batch for row in p.ids]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
        input_ids, mask = _native.pack(tokens=flat, offsets=offsets, pad_id=self._pad_id)
        vectors = self._encoder.encode(input_ids, mask)
        if self._observer is not None:
            self._observer.on_batch(len(rows), time.perf_counter() - started)
        return vectors

    def _resolve(
        self, done: asyncio.Future[npt.NDArray[np.float32]], *, batch: Sequence[_Pending]
    ) -> None:
        self._idle.set()
        try:
            vectors = done.result()
        except Exception:
            logger.exception("encoder %s: batch of %d calls failed", self.name, len(batch))
            if len(batch) > 1:
                # One bad call must fail alone: run each call of the failed batch by itself.
                for pending in batch:
                    pending.solo = True
                    self._queue.put_nowait(pending)
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(Internal(f"model {self.name!r} failed to embed"))
            return
        start = 0
        for pending in batch:
            end = start + len(pending.ids)
            if not pending.future.done():
                pending.future.set_result(vectors[start:end])
            start = end

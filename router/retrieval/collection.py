"""Collection: a VectorIndex made durable and safe to use from the event loop.

Lock discipline:
- `_write` (asyncio.Lock) serialises Upsert, Delete and compaction. A write appends its WAL
  record and fsyncs it, then applies it to the index, both in the executor, and is acknowledged
  only after both: an acknowledged write survives kill -9 (restart = snapshot + WAL replay).
- Searches take `_gate` shared, keyed by their ef, and run in the executor beside each other and
  beside a write's add_items/mark_deleted (hnswlib supports that and releases the GIL).
  Unfiltered searches are batched: those that arrive while a batch with their ef runs go into
  the next one, answered by one knn_query over all their rows (one executor hop and one gate
  entry per batch, hnswlib spreading the rows over the cores) — the per-query hop cost a third
  of a query's time on one core.
- Growing the index (`resize_index`) holds `_write` and takes `_gate` exclusively, since hnswlib
  reallocates its arrays under any concurrent search.
- Compaction (snapshot + WAL truncation) holds `_write` only: saving reads the index, as searches
  do. It starts in the background once the WAL holds `compact_after` records."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from router.retrieval.gate import SharedGate
from router.retrieval.index import VectorIndex, Vectors
from router.retrieval.snapshot import write_snapshot
from router.retrieval.spec import CollectionSpec, Document, Filter, Hit
from router.retrieval.wal import Wal, decode_vectors, encode_vectors

logger = logging.getLogger(__name__)
_THREADS = max(1, len(os.sched_getaffinity(0)))

T = TypeVar("T")


class Collection:
    def __init__(
        self,
        folder: Path,
        index: VectorIndex,
        wal: Wal,
        seq: int,
        *,
        compact_after: int = 10_000,
        fsync: bool = True,
    ) -> None:
        self.folder = folder
        self.index = index
        self._wal = wal
        self._seq = seq
        self._compact_after = compact_after
        self._fsync = fsync
        self._write = asyncio.Lock()
        self._gate = SharedGate(index.set_ef)
        self._batches: dict[int, list[tuple[Vectors, int, asyncio.Future[list[Hit]]]]] = {}
        self._running: set[int] = set()
        self._compaction: asyncio.Task[None] | None = None

    @property
    def spec(self) -> CollectionSpec:
        return self.index.spec

    def __len__(self) -> int:
        return len(self.index)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    async def upsert(self, docs: list[Document], vectors: Vectors) -> int:
        """Durable once it returns. `vectors` rows match `docs` and have the right dimension."""
        async with self._write:
            record = {
                "seq": self._seq + 1,
                "op": "upsert",
                "docs": [d.to_json() for d in docs],
                "vectors": encode_vectors(vectors),
            }
            await self._run(self._wal.append, record)
            self._seq += 1
            await self._apply_upsert(docs, vectors)
        self._maybe_compact()
        return len(docs)

    async def _apply_upsert(self, docs: list[Document], vectors: Vectors) -> None:
        capacity = self.index.capacity_for([d.id for d in docs])
        if capacity is not None:
            async with self._gate.exclusive():
                await self._run(self.index.resize, capacity)
        await self._run(self.index.upsert, docs, vectors)

    async def delete(self, ids: list[str]) -> int:
        """Delete documents by id (a parent's id deletes its chunks); the number removed."""
        async with self._write:
            present = [i for i in dict.fromkeys(ids) if self.index.known(i)]
            if not present:
                return 0
            await self._run(
                self._wal.append, {"seq": self._seq + 1, "op": "delete", "ids": present}
            )
            self._seq += 1
            deleted = await self._run(self.index.delete, present)
        self._maybe_compact()
        return deleted

    async def search(self, query: Vectors, k: int, ef: int | None, flt: Filter) -> list[Hit]:
        ef = ef or self.spec.ef
        if flt:  # a filter is a per-query predicate: no batching
            async with self._gate.shared(ef):
                return await self._run(self.index.search, query, k, flt)
        future: asyncio.Future[list[Hit]] = asyncio.get_running_loop().create_future()
        waiting = self._batches.get(ef)
        if waiting is None:
            waiting = self._batches[ef] = []
            if ef not in self._running:
                self._running.add(ef)
                asyncio.get_running_loop().create_task(self._search_batches(ef))
        waiting.append((query, k, future))
        return await future

    async def _search_batches(self, ef: int) -> None:
        """Run the batches of one ef until none is waiting."""
        try:
            while batch := self._batches.pop(ef, None):
                live = [(q, k, f) for q, k, f in batch if not f.cancelled()]
                if not live:
                    continue
                queries = np.stack([q.reshape(-1) for q, _, _ in live]).astype(np.float32)
                try:
                    async with self._gate.shared(ef):
                        results = await self._run(
                            self.index.search_many, queries, [k for _, k, _ in live], _THREADS
                        )
                except Exception as exc:
                    for _, _, f in live:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                for (_, _, f), hits in zip(live, results, strict=True):
                    if not f.done():
                        f.set_result(hits)
        finally:
            self._running.discard(ef)

    # ---- durability --------------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        if self._wal.records >= self._compact_after and (
            self._compaction is None or self._compaction.done()
        ):
            self._compaction = asyncio.create_task(self.compact())

    async def compact(self) -> None:
        """Write a snapshot holding every acknowledged write, then empty the WAL."""
        async with self._write:
            save = functools.partial(write_snapshot, fsync=self._fsync)
            await self._run(save, self.folder, self.index, self._seq)
            await self._run(self._wal.truncate)
        logger.info("collection %r compacted at seq %d", self.spec.name, self._seq)

    def replay(self, records: list[dict[str, Any]]) -> None:
        """Apply WAL records newer than the snapshot. Blocking; only while opening."""
        for record in records:
            if record["seq"] <= self._seq:
                continue
            if record["op"] == "upsert":
                docs = [Document.from_json(d) for d in record["docs"]]
                capacity = self.index.capacity_for([d.id for d in docs])
                if capacity is not None:
                    self.index.resize(capacity)
                self.index.upsert(docs, decode_vectors(record["vectors"], self.spec.dimension))
            else:
                self.index.delete(record["ids"])
            self._seq = record["seq"]

    async def close(self) -> None:
        if self._compaction is not None:
            await self._compaction
        async with self._write:
            self._wal.close()

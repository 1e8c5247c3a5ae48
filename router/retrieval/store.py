"""CollectionStore: the collections under one folder, one sub-folder each (`snapshot`, `wal`).

Opening a collection = read its snapshot, replay the WAL records newer than it. Creating one
writes an empty snapshot first, so a folder without a snapshot is a create that never finished
and is removed."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from router.errors import AlreadyExists, NotFound, quote
from router.retrieval.collection import Collection
from router.retrieval.index import VectorIndex
from router.retrieval.snapshot import SNAPSHOT, fsync_dir, read_snapshot, write_snapshot
from router.retrieval.spec import NAME_RE, CollectionSpec
from router.retrieval.wal import Wal, read_records

logger = logging.getLogger(__name__)

WAL = "wal"


class CollectionStore:
    def __init__(self, root: Path, *, compact_after: int = 10_000, fsync: bool = True) -> None:
        self.root = root
        self._compact_after = compact_after
        self._fsync = fsync
        self._collections: dict[str, Collection] = {}
        self._lock = asyncio.Lock()  # create and drop

    def _open_sync(self, folder: Path) -> Collection:
        index, seq = read_snapshot(folder)
        records, _ = read_records(folder / WAL)
        collection = Collection(
            folder,
            index,
            Wal(folder / WAL, fsync=self._fsync),
            seq,
            compact_after=self._compact_after,
            fsync=self._fsync,
        )
        collection.replay(records)
        logger.info(
            "opened collection %r: %d documents, %d WAL records replayed",
            index.spec.name,
            len(index),
            len(records),
        )
        return collection

    def load_sync(self) -> None:
        """Open every collection on disk. Blocking: call it off the event loop at start-up."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or not NAME_RE.fullmatch(folder.name):
                continue
            if not (folder / SNAPSHOT).exists():
                logger.warning("removing %s: its creation never finished", folder)
                shutil.rmtree(folder)
                continue
            self._collections[folder.name] = self._open_sync(folder)

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.load_sync)

    def names(self) -> list[str]:
        return sorted(self._collections)

    def get(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is None:
            raise NotFound(f"collection {quote(name)} does not exist; collections: {self.names()}")
        return collection

    async def create(self, spec: CollectionSpec) -> Collection:
        spec.validate()
        async with self._lock:
            if spec.name in self._collections:
                raise AlreadyExists(f"collection {spec.name!r} already exists")
            folder = self.root / spec.name
            collection = await asyncio.get_running_loop().run_in_executor(
                None, self._create_sync, folder, spec
            )
            self._collections[spec.name] = collection
            return collection

    def _create_sync(self, folder: Path, spec: CollectionSpec) -> Collection:
        if folder.exists():  # left by a drop that crashed half way
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_snapshot(folder, VectorIndex(spec), 0, fsync=self._fsync)
        if self._fsync:
            fsync_dir(self.root)
        return Collection(
            folder,
            VectorIndex(spec),
            Wal(folder / WAL, fsync=self._fsync),
            0,
            compact_after=self._compact_after,
            fsync=self._fsync,
        )

    async def drop(self, name: str) -> None:
        async with self._lock:
            collection = self.get(name)
            del self._collections[name]
            await collection.close()
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, collection.folder)

    async def close(self) -> None:
        for collection in self._collections.values():
            await collection.close()
        self._collections.clear()

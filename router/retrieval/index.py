"""VectorIndex: one hnswlib index plus the id ↔ label maps and the documents. Synchronous; the
lock discipline lives in router.retrieval.collection.

Labels are hnswlib's integer keys. A new document always gets a fresh label; hnswlib's
`replace_deleted=True` puts it in the slot of a deleted element, so slots are reused while labels
never are (reusing a deleted label would hit hnswlib's "can't update deleted elements" error).
An upsert of an existing id keeps its label and hnswlib updates the vector in place.

Filtered search uses hnswlib's `filter` callable, which keeps the graph walk going through
non-matching nodes until k matches are found, so results stay exact-ish for selective filters
where over-fetching would come back short. When fewer than k reachable nodes match, hnswlib raises
and we fall back to an exact scan over the matching documents.

Chunks (documents with a `parent`, see router.retrieval.chunking) are indexed like any document;
`_chunks` maps each parent id to its chunk ids. It is derived from the documents (rebuilt on
load, kept up to date by upsert and delete), so the snapshot and the WAL need nothing more. An
upsert owns the names it writes: writing parent P (its chunks, or a whole document P) first
removes P's old chunks and the old whole document P that the batch does not rewrite, and deleting
P deletes its chunks. Both follow from the index's state and the record alone, so WAL replay
repeats them exactly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hnswlib  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import numpy.typing as npt

from router.retrieval.spec import CollectionSpec, Document, Filter, Hit, Metric

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
INITIAL_CAPACITY = 1024


class VectorIndex:
    def __init__(self, spec: CollectionSpec, *, capacity: int = INITIAL_CAPACITY) -> None:
        self.spec = spec
        self._index: Any = hnswlib.Index(space=spec.metric.value, dim=spec.dimension)
        self._index.init_index(
            max_elements=capacity,
            M=spec.m,
            ef_construction=spec.ef_construction,
            allow_replace_deleted=True,
        )
        self._index.set_ef(spec.ef)
        self._labels: dict[str, int] = {}
        self._docs: dict[int, Document] = {}
        self._chunks: dict[str, set[str]] = {}
        self._next_label = 0

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._labels

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    def known(self, doc_id: str) -> bool:
        """A stored document or the parent of stored chunks."""
        return doc_id in self._labels or doc_id in self._chunks

    def chunks_of(self, parent: str) -> list[str]:
        return sorted(self._chunks.get(parent, ()))

    def expand(self, ids: list[str]) -> list[str]:
        """The stored documents `ids` name: each id itself, if stored, and its chunks."""
        out: dict[str, None] = {}
        for doc_id in ids:
            out.update(dict.fromkeys(self.chunks_of(doc_id)))
            if doc_id in self._labels:
                out[doc_id] = None
        return list(out)

    def _link(self, doc: Document) -> None:
        if doc.parent:
            self._chunks.setdefault(doc.parent, set()).add(doc.id)

    def _unlink(self, doc: Document) -> None:
        siblings = self._chunks.get(doc.parent) if doc.parent else None
        if siblings is not None:
            siblings.discard(doc.id)
            if not siblings:
                del self._chunks[doc.parent]

    def get(self, doc_id: str) -> Document | None:
        label = self._labels.get(doc_id)
        return None if label is None else self._docs.get(label)

    def set_ef(self, ef: int) -> None:
        self._index.set_ef(ef)

    def capacity_for(self, ids: list[str]) -> int | None:
        """The capacity to resize to before upserting `ids`, or None when they fit. Deleted slots
        are reused, so only the live count matters."""
        new = len({i for i in ids if i not in self._labels})
        needed = len(self._labels) + new
        if needed <= self.capacity:
            return None
        return max(needed, 2 * self.capacity)

    def resize(self, capacity: int) -> None:
        """Not safe beside any other call on this index: hold the gate exclusively."""
        logger.info("resizing collection %r to %d", self.spec.name, capacity)
        self._index.resize_index(capacity)

    def upsert(self, docs: list[Document], vectors: Vectors) -> None:
        """Insert or replace; the capacity must already suffice (see capacity_for). Replacing a
        parent drops its old chunks (and its old whole document) that the batch does not rewrite."""
        last: dict[str, int] = {doc.id: row for row, doc in enumerate(docs)}  # later rows win
        owners = list(dict.fromkeys(docs[row].parent or doc_id for doc_id, row in last.items()))
        stale = [doc_id for doc_id in self.expand(owners) if doc_id not in last]
        if stale:
            self._remove(stale)
        old_rows = [row for doc_id, row in last.items() if doc_id in self._labels]
        new_rows = [row for doc_id, row in last.items() if doc_id not in self._labels]
        if old_rows:
            labels = [self._labels[docs[row].id] for row in old_rows]
            self._index.add_items(vectors[old_rows], labels)
            for row, label in zip(old_rows, labels, strict=True):
                self._unlink(self._docs[label])
                self._docs[label] = docs[row]
                self._link(docs[row])
        if new_rows:
            labels = list(range(self._next_label, self._next_label + len(new_rows)))
            self._next_label += len(new_rows)
            # Documents first: a concurrent search that finds the label must find its document.
            for row, label in zip(new_rows, labels, strict=True):
                self._docs[label] = docs[row]
            self._index.add_items(vectors[new_rows], labels, replace_deleted=True)
            for row, label in zip(new_rows, labels, strict=True):
                self._labels[docs[row].id] = label
                self._link(docs[row])

    def delete(self, ids: list[str]) -> int:
        """Delete documents by id, a parent's id deleting its chunks; the number removed."""
        return self._remove(self.expand(ids))

    def _remove(self, ids: list[str]) -> int:
        deleted = 0
        for doc_id in dict.fromkeys(ids):
            label = self._labels.pop(doc_id, None)
            if label is None:
                continue
            # Marked deleted before the document goes: a search skips labels it cannot resolve.
            self._index.mark_deleted(label)
            self._unlink(self._docs.pop(label))
            deleted += 1
        return deleted

    # ---- search ------------------------------------------------------------------------------

    def search(self, query: Vectors, k: int, flt: Filter) -> list[Hit]:
        """Up to k hits, best first. The caller has set the ef (see SharedGate)."""
        k = min(k, len(self._labels))
        if k == 0:
            return []
        docs = self._docs
        predicate: Callable[[int], bool] | None = None
        if flt:

            def predicate(label: int) -> bool:
                doc = docs.get(label)
                return doc is not None and flt.matches(doc)

        try:
            labels, distances = self._index.knn_query(query, k=k, num_threads=1, filter=predicate)
        except RuntimeError:  # fewer than k reachable elements pass: scan them all instead
            return self._exact(query, k, flt)
        hits = []
        for label, distance in zip(labels[0].tolist(), distances[0].tolist(), strict=True):
            doc = docs.get(label)
            if doc is not None:
                hits.append(Hit(doc, self._score(distance)))
        return hits

    def search_many(self, queries: Vectors, ks: list[int], threads: int) -> list[list[Hit]]:
        """Unfiltered searches of several queries in one hnswlib call (it spreads the rows over
        `threads` and releases the GIL): row i gets up to ks[i] hits, best first."""
        k = min(max(ks), len(self._labels))
        if k == 0:
            return [[] for _ in ks]
        try:
            labels, distances = self._index.knn_query(queries, k=k, num_threads=threads)
        except RuntimeError:  # fewer than k reachable: answer each row on its own
            return [self.search(q[None, :], n, Filter()) for q, n in zip(queries, ks, strict=True)]
        docs = self._docs
        out = []
        for row_labels, row_distances, n in zip(
            labels.tolist(), distances.tolist(), ks, strict=True
        ):
            hits = []
            for label, distance in zip(row_labels[:n], row_distances[:n], strict=True):
                doc = docs.get(label)
                if doc is not None:
                    hits.append(Hit(doc, self._score(distance)))
            out.append(hits)
        return out

    def _exact(self, query: Vectors, k: int, flt: Filter) -> list[Hit]:
        for _ in range(3):
            pairs = [
                (label, d) for label, d in list(self._docs.items()) if not flt or flt.matches(d)
            ]
            if not pairs:
                return []
            try:  # a concurrent delete may remove a label between the scan and the fetch
                stored = np.asarray(
                    self._index.get_items([label for label, _ in pairs]), dtype=np.float32
                )
            except RuntimeError:
                continue
            distances = self.distances(stored, query)
            order = np.argsort(distances, kind="stable")[:k]
            return [Hit(pairs[i][1], self._score(float(distances[i]))) for i in order]
        raise RuntimeError(f"collection {self.spec.name!r} kept changing during an exact scan")

    def distances(self, stored: Vectors, query: Vectors) -> npt.NDArray[np.float32]:
        """hnswlib's distance of each stored vector to the query (stored cosine rows are unit)."""
        q = query.reshape(-1).astype(np.float32)
        if self.spec.metric is Metric.L2:
            diff = stored - q
            squared: npt.NDArray[np.float32] = (diff * diff).sum(axis=1)
            return squared
        if self.spec.metric is Metric.COSINE:
            q = q / max(float(np.linalg.norm(q)), 1e-30)
        result: npt.NDArray[np.float32] = np.float32(1.0) - stored @ q
        return result

    def _score(self, distance: float) -> float:
        return -distance if self.spec.metric is Metric.L2 else 1.0 - distance

    # ---- persistence -------------------------------------------------------------------------

    def save(self, index_path: Path) -> dict[str, Any]:
        """Write the hnswlib index to `index_path`; return the rest of the state as JSON data."""
        self._index.save_index(str(index_path))
        return {
            "next_label": self._next_label,
            "docs": [[label, doc.to_json()] for label, doc in self._docs.items()],
        }

    @classmethod
    def load(cls, spec: CollectionSpec, index_path: Path, state: dict[str, Any]) -> VectorIndex:
        self = cls(spec, capacity=1)
        self._index = hnswlib.Index(space=spec.metric.value, dim=spec.dimension)
        self._index.load_index(str(index_path), allow_replace_deleted=True)
        self._index.set_ef(spec.ef)
        self._next_label = int(state["next_label"])
        for label, data in state["docs"]:
            doc = Document.from_json(data)
            self._docs[int(label)] = doc
            self._labels[doc.id] = int(label)
            self._link(doc)
        return self

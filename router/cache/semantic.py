"""The semantic cache: an HNSW index over prompt embeddings, one per generation model. A prompt
whose embedding is at least `threshold` cosine-similar to a remembered one gets that one's
answer (through the exact cache, which holds the answers).

Only prompts with the same context match: the namespace of an entry hashes the model build, the
sampling parameters and everything but the question (system prompt, earlier turns, retrieval
option), so "what is 2+2?" never matches across different system prompts. The index is per
process (vectors are not shared through Redis); the oldest entries are replaced first."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import hnswlib  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import numpy.typing as npt

from router.cache.config import SemanticCacheConfig
from router.telemetry import Metrics

CANDIDATES = 4  # nearest entries checked for a matching namespace


@dataclass(frozen=True, slots=True)
class SemanticHit:
    key: bytes
    """Exact-cache key of the remembered answer."""
    similarity: float


class _ModelIndex:
    def __init__(self, dimension: int, capacity: int) -> None:
        self.index: Any = hnswlib.Index(space="ip", dim=dimension)
        # allow_replace_deleted: a replaced entry's slot is reused, so memory stays bounded.
        self.index.init_index(
            max_elements=capacity, ef_construction=100, M=16, allow_replace_deleted=True
        )
        self.index.set_ef(32)
        self.capacity = capacity
        self.entries: dict[int, tuple[bytes, bytes]] = {}  # label -> (namespace, answer key)
        self.order: collections.deque[int] = collections.deque()
        self.per_namespace: collections.Counter[bytes] = collections.Counter()
        self.next_label = 0


class SemanticCache:
    def __init__(self, config: SemanticCacheConfig, metrics: Metrics) -> None:
        self.config = config
        self._indexes: dict[str, _ModelIndex] = {}
        self._hit = metrics.cache_lookups.labels("semantic", "hit")
        self._miss = metrics.cache_lookups.labels("semantic", "miss")
        self._evictions = metrics.cache_evictions.labels("semantic")

    def lookup(
        self, model: str, namespace: bytes, vector: npt.NDArray[np.float32]
    ) -> SemanticHit | None:
        """The most similar remembered prompt of this model and namespace, if similar enough."""
        idx = self._indexes.get(model)
        k = min(CANDIDATES, idx.per_namespace[namespace]) if idx is not None else 0
        if idx is None or k == 0:
            self._miss.inc()
            return None
        entries = idx.entries

        def same_context(label: int) -> bool:
            entry = entries.get(label)
            return entry is not None and entry[0] == namespace

        try:
            labels, distances = idx.index.knn_query(vector, k=k, filter=same_context)
        except RuntimeError:  # the graph walk found fewer than k: treat as a miss
            self._miss.inc()
            return None
        similarity = min(1.0, 1.0 - float(distances[0][0]))  # rounding can pass 1
        if similarity < self.config.threshold:
            self._miss.inc()
            return None
        self._hit.inc()
        return SemanticHit(entries[int(labels[0][0])][1], similarity)

    def add(
        self, model: str, namespace: bytes, vector: npt.NDArray[np.float32], key: bytes
    ) -> None:
        idx = self._indexes.get(model)
        if idx is None:
            idx = self._indexes[model] = _ModelIndex(len(vector), self.config.max_entries)
        replace = False
        if len(idx.entries) >= idx.capacity:
            oldest = idx.order.popleft()
            idx.per_namespace[idx.entries.pop(oldest)[0]] -= 1
            idx.index.mark_deleted(oldest)
            self._evictions.inc()
            replace = True
        label = idx.next_label
        idx.next_label += 1
        idx.index.add_items(vector.reshape(1, -1), [label], replace_deleted=replace)
        idx.entries[label] = (namespace, key)
        idx.per_namespace[namespace] += 1
        idx.order.append(label)

    def __len__(self) -> int:
        return sum(len(i.entries) for i in self._indexes.values())

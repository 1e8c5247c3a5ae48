from __future__ import annotations

import numpy as np
import numpy.typing as npt

from router.cache.config import SemanticCacheConfig
from router.cache.semantic import SemanticCache
from router.telemetry import Metrics

DIM = 32


def unit(rng: np.random.Generator) -> npt.NDArray[np.float32]:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def near(
    v: npt.NDArray[np.float32], rng: np.random.Generator, noise: float
) -> npt.NDArray[np.float32]:
    w = v + noise * rng.standard_normal(DIM).astype(np.float32)
    return (w / np.linalg.norm(w)).astype(np.float32)


def test_a_similar_prompt_in_the_same_namespace_hits() -> None:
    rng = np.random.default_rng(0)
    cache = SemanticCache(SemanticCacheConfig(enabled=True, threshold=0.9), Metrics())
    stored = [unit(rng) for _ in range(50)]
    for i, v in enumerate(stored):
        cache.add("m", b"ns", v, f"key{i}".encode())
    hit = cache.lookup("m", b"ns", near(stored[7], rng, 0.05))
    assert hit is not None and hit.key == b"key7" and 0.9 <= hit.similarity <= 1.0
    assert cache.lookup("m", b"ns", unit(rng)) is None  # random vectors are far apart
    assert cache.lookup("m", b"other", stored[7]) is None
    assert cache.lookup("other-model", b"ns", stored[7]) is None


def test_the_nearest_entry_of_the_namespace_wins_over_a_nearer_foreign_one() -> None:
    rng = np.random.default_rng(1)
    cache = SemanticCache(SemanticCacheConfig(enabled=True, threshold=0.5), Metrics())
    v = unit(rng)
    cache.add("m", b"a", v, b"foreign")
    cache.add("m", b"b", near(v, rng, 0.1), b"mine")
    hit = cache.lookup("m", b"b", v)
    assert hit is not None and hit.key == b"mine"


def test_the_oldest_entries_are_replaced_at_capacity() -> None:
    rng = np.random.default_rng(2)
    metrics = Metrics()
    cache = SemanticCache(SemanticCacheConfig(enabled=True, max_entries=10), metrics)
    vectors = [unit(rng) for _ in range(25)]
    for i, v in enumerate(vectors):
        cache.add("m", b"ns", v, str(i).encode())
    assert len(cache) == 10
    assert cache.lookup("m", b"ns", vectors[0]) is None
    hit = cache.lookup("m", b"ns", vectors[24])
    assert hit is not None and hit.key == b"24"
    evictions = metrics.registry.get_sample_value(
        "irouter_cache_evictions_total", {"layer": "semantic"}
    )
    assert evictions == 15

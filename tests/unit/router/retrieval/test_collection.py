"""Collections without a server: upsert/search/delete/replace, resize, filters, persistence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from router.errors import AlreadyExists, InvalidArgument, NotFound
from router.retrieval.index import VectorIndex
from router.retrieval.snapshot import SNAPSHOT, read_snapshot, write_snapshot
from router.retrieval.spec import CollectionSpec, Document, Filter, Metric, Range
from router.retrieval.store import WAL, CollectionStore

DIM = 16


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def docs(n: int, start: int = 0) -> list[Document]:
    return [
        Document(f"d{i}", f"text {i}", {"parity": "even" if i % 2 == 0 else "odd"}, {"n": i})
        for i in range(start, start + n)
    ]


def spec(name: str = "c", metric: Metric = Metric.COSINE, dim: int = DIM) -> CollectionSpec:
    return CollectionSpec(name=name, dimension=dim, metric=metric)


async def make_store(root: Path, **kw: object) -> CollectionStore:
    store = CollectionStore(root, **kw)  # type: ignore[arg-type]
    await store.load()
    return store


async def test_upsert_search_delete_replace(tmp_path: Path) -> None:
    store = await make_store(tmp_path)
    c = await store.create(spec())
    vectors = unit(50)
    await c.upsert(docs(50), vectors)
    hits = await c.search(vectors[7], 3, None, Filter())
    assert hits[0].document.id == "d7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert await c.delete(["d7", "nope"]) == 1
    assert all(h.document.id != "d7" for h in await c.search(vectors[7], 10, None, Filter()))
    # Replacing d8's vector with d7's old one makes d8 the nearest; the count is unchanged.
    await c.upsert([Document("d8", "new")], vectors[7:8])
    hits = await c.search(vectors[7], 1, None, Filter())
    assert (hits[0].document.id, hits[0].document.text) == ("d8", "new")
    assert len(c) == 49
    await store.close()


async def test_deleted_slots_are_reused_and_index_grows(tmp_path: Path) -> None:
    index = VectorIndex(spec(), capacity=8)
    index.upsert(docs(8), unit(8))
    assert index.capacity_for(["x"]) == 16
    index.delete(["d0", "d1"])
    assert index.capacity_for(["x", "y"]) is None  # two deleted slots take them
    index.upsert([Document("x"), Document("y")], unit(2, seed=1))
    assert index.capacity == 8 and len(index) == 8
    store = await make_store(tmp_path)
    c = await store.create(spec())
    vectors = unit(3000, seed=2)
    for start in range(0, 3000, 500):
        await c.upsert(docs(500, start), vectors[start : start + 500])
    assert len(c) == 3000 and c.index.capacity >= 3000
    assert (await c.search(vectors[2999], 1, None, Filter()))[0].document.id == "d2999"
    await store.close()


async def test_filters_equality_membership_and_ranges(tmp_path: Path) -> None:
    store = await make_store(tmp_path)
    c = await store.create(spec())
    vectors = unit(200)
    await c.upsert(docs(200), vectors)
    odd = await c.search(vectors[0], 10, None, Filter(strings=(("parity", frozenset({"odd"})),)))
    assert len(odd) == 10 and all(int(h.document.id[1:]) % 2 == 1 for h in odd)
    ranged = await c.search(vectors[0], 50, None, Filter(ranges=(Range("n", 10, 12),)))
    assert sorted(h.document.id for h in ranged) == ["d10", "d11", "d12"]  # exact fallback
    both = Filter(strings=(("parity", frozenset({"even", "x"})),), ranges=(Range("n", max=5),))
    assert sorted(h.document.id for h in await c.search(vectors[0], 10, 16, both)) == [
        "d0",
        "d2",
        "d4",
    ]
    assert await c.search(vectors[0], 5, None, Filter(ranges=(Range("missing", 0),))) == []
    with pytest.raises(InvalidArgument, match="min=3 > max=1"):
        Filter(ranges=(Range("n", 3, 1),)).validate()
    with pytest.raises(InvalidArgument, match="no values"):
        Filter(strings=(("parity", frozenset()),)).validate()
    await store.close()


@pytest.mark.parametrize("metric", [Metric.L2, Metric.INNER_PRODUCT, Metric.COSINE])
def test_scores_match_brute_force(metric: Metric) -> None:
    index = VectorIndex(spec(metric=metric))
    vectors = unit(100) * 2
    index.upsert(docs(100), vectors)
    query = unit(1, seed=5)[0]
    hits = index.search(query, 5, Filter())
    exact = {"l2": -((vectors - query) ** 2).sum(1), "ip": vectors @ query}.get(
        metric.value, (vectors / 2) @ query
    )
    best = np.argsort(-exact)[:5]
    assert [h.document.id for h in hits] == [f"d{i}" for i in best]
    assert [h.score for h in hits] == pytest.approx(exact[best].tolist(), abs=1e-4)


async def test_store_errors(tmp_path: Path) -> None:
    store = await make_store(tmp_path)
    await store.create(spec("a"))
    with pytest.raises(AlreadyExists, match="'a' already exists"):
        await store.create(spec("a"))
    with pytest.raises(NotFound, match=r"'b' does not exist; collections: \['a'\]"):
        store.get("b")
    with pytest.raises(InvalidArgument, match="name='B!'"):
        await store.create(spec("B!"))
    await store.drop("a")
    assert store.names() == [] and not (tmp_path / "a").exists()
    await store.close()


async def test_persistence_round_trip_with_compaction(tmp_path: Path) -> None:
    store = await make_store(tmp_path, compact_after=3)
    c = await store.create(spec())
    vectors = unit(40)
    for start in range(0, 40, 10):
        await c.upsert(docs(10, start), vectors[start : start + 10])
    await c.delete(["d3"])
    await store.close()  # waits for the background compaction
    reopened = await make_store(tmp_path)
    c = reopened.get("c")
    assert len(c) == 39 and c.index.get("d5") == docs(1, 5)[0]
    assert (await c.search(vectors[20], 1, None, Filter()))[0].document.id == "d20"
    assert all(h.document.id != "d3" for h in await c.search(vectors[3], 39, None, Filter()))
    await reopened.close()


async def test_wal_replay_after_crash_and_torn_tail(tmp_path: Path) -> None:
    store = await make_store(tmp_path)
    c = await store.create(spec())
    vectors = unit(20)
    await c.upsert(docs(20), vectors)
    await c.delete(["d0"])
    # Simulated crash: no snapshot since creation, and half a record at the end of the WAL.
    with open(tmp_path / "c" / WAL, "ab") as wal:
        wal.write(b"\x50\x00\x00\x00garbage")
    reopened = await make_store(tmp_path)
    c2 = reopened.get("c")
    assert len(c2) == 19 and "d0" not in c2.index
    assert (await c2.search(vectors[9], 1, None, Filter()))[0].document.id == "d9"
    # The torn tail was cut off, so new records append cleanly after the good ones.
    await c2.upsert(docs(1, 100), unit(1, seed=9))
    await reopened.close()
    again = await make_store(tmp_path)
    assert len(again.get("c")) == 20
    await again.close()
    await store.close()


def test_snapshot_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = VectorIndex(spec())
    index.upsert(docs(5), unit(5))
    write_snapshot(tmp_path, index, 1)
    index.upsert(docs(5, 5), unit(5, seed=1))

    def crash(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("router.retrieval.snapshot.os.replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_snapshot(tmp_path, index, 2)
    loaded, seq = read_snapshot(tmp_path)  # the old snapshot is intact
    assert (seq, len(loaded)) == (1, 5) and (tmp_path / SNAPSHOT).exists()


async def test_searches_run_beside_upserts(tmp_path: Path) -> None:
    store = await make_store(tmp_path, fsync=False)
    c = await store.create(spec())
    vectors = unit(2000)
    await c.upsert(docs(100), vectors[:100])

    async def writer() -> None:
        for start in range(100, 2000, 100):
            await c.upsert(docs(100, start), vectors[start : start + 100])

    async def reader(ef: int) -> None:
        for i in range(40):
            hits = await c.search(vectors[i], 5, ef, Filter())
            assert hits[0].document.id == f"d{i}"

    await asyncio.gather(writer(), reader(32), reader(64), reader(64))
    assert len(c) == 2000
    await store.close()


def test_recall_at_10_against_brute_force() -> None:
    """Random unit vectors (not MiniLM embeddings; see the integration test for real text)."""
    n, dim = 2000, 384
    vectors = unit(n, seed=3, dim=dim)
    index = VectorIndex(CollectionSpec("r", dim, ef=200), capacity=n)
    index.upsert(docs(n), vectors)
    queries = unit(100, seed=4, dim=dim)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = 0
    for q, t in zip(queries, truth, strict=True):
        ids = {h.document.id for h in index.search(q, 10, Filter())}
        found += len(ids & {f"d{i}" for i in t})
    assert found / 1000 >= 0.95


async def test_concurrent_unfiltered_searches_are_batched_with_the_same_answers(
    tmp_path: Path,
) -> None:
    store = await make_store(tmp_path)
    c = await store.create(spec())
    vectors = unit(300, seed=3)
    await c.upsert(docs(300), vectors)
    queries = unit(40, seed=4)
    alone = [
        [h.document.id for h in c.index.search(q[None, :], 1 + i % 7, Filter())]
        for i, q in enumerate(queries)
    ]
    calls = [c.search(q, 1 + i % 7, None, Filter()) for i, q in enumerate(queries)]
    # One search is cancelled while waiting: the others still get their answers.
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)
    tasks[5].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[5], asyncio.CancelledError)
    for i, hits in enumerate(results):
        if i != 5:
            assert not isinstance(hits, BaseException)
            assert [h.document.id for h in hits] == alone[i]
    # Different ef values form separate batches; each still answers.
    mixed = await asyncio.gather(
        *(c.search(q, 3, 10 + 20 * (i % 2), Filter()) for i, q in enumerate(queries[:8]))
    )
    assert all(len(hits) == 3 for hits in mixed)
    await store.close()

"""Retrieval benchmarks: RetrievalService in a separate router process, driven over gRPC, each
figure printed as a ratio against a baseline measured in the same run (in-process hnswlib, or the
same router with the WAL fsync off).

    python -m loadtest.benchmarks.retrieval_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import hnswlib  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import numpy.typing as npt

from loadtest.benchmarks.serve_bench import EMB, ROUTER_PIDS, _h2load, line, router_process
from router.config_file import load_config
from router.proto.irouter.v1 import retrieval_service_pb2 as pb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as pb_grpc

DIM = 384
M = 16
EF_CONSTRUCTION = 100
EF = 64
K = 10
COLLECTION = "bench"
QUERIES = 1_000
RECALL_QUERIES = 200
CALLERS = 32

Array = npt.NDArray[np.float32]


def unit_vectors(n: int, seed: int) -> Array:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def write_config(tmp: Path, fsync: bool = True) -> Path:
    data_dir = tmp / "collections"
    data_dir.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(
        "retrieval:\n"
        "  enabled: true\n"
        f"  data_dir: {data_dir}\n"
        f"  fsync: {'true' if fsync else 'false'}\n"
        "models:\n"
        f"  - {{name: {EMB}, kind: embed, artifact: {EMB}}}\n"
    )
    return path


def _vector(v: Array) -> pb.Vector:
    return pb.Vector(values=v.tolist())


def _config() -> pb.CollectionConfig:
    return pb.CollectionConfig(
        name=COLLECTION,
        dimension=DIM,
        metric=pb.METRIC_COSINE,
        m=M,
        ef_construction=EF_CONSTRUCTION,
        ef=EF,
    )


async def _upsert_all(stub: pb_grpc.RetrievalServiceStub, data: Array, batch: int) -> float:
    """Create the collection, upsert `data` in `batch`-sized calls one after another; seconds."""
    await stub.CreateCollection(pb.CreateCollectionRequest(config=_config()))
    requests = [
        pb.UpsertRequest(
            collection=COLLECTION,
            documents=[
                pb.Document(id=str(start + j), vector=_vector(v))
                for j, v in enumerate(data[start : start + batch])
            ],
        )
        for start in range(0, len(data), batch)
    ]
    started = time.perf_counter()
    for request in requests:
        await stub.Upsert(request)
    return time.perf_counter() - started


# ---- search -------------------------------------------------------------------------------------


def bare_knn_qps(
    data: Array, queries: Array, seconds: float
) -> tuple[float, float, list[list[int]]]:
    """In-process hnswlib: build time (s), knn_query QPS one query per call, recall-query ids."""
    index = hnswlib.Index(space="cosine", dim=DIM)
    index.init_index(max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION)
    started = time.perf_counter()
    index.add_items(data, np.arange(len(data)))
    build = time.perf_counter() - started
    index.set_ef(EF)
    index.knn_query(queries[:1], k=K)
    done = 0
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < stop_at:
        index.knn_query(queries[done % len(queries)][None, :], k=K)
        done += 1
    qps = done / (time.perf_counter() - started)
    labels, _ = index.knn_query(queries[:RECALL_QUERIES], k=K)
    return build, qps, labels.tolist()


async def grpc_search(
    target: str, data: Array, queries: Array, seconds: float
) -> tuple[float, float, list[list[int]]]:
    """Upsert time (s), Search QPS with CALLERS on one channel, ids of the recall queries."""
    requests = [
        pb.SearchRequest(collection=COLLECTION, vector=_vector(q), top_k=K, ef=EF) for q in queries
    ]
    done = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        upsert_s = await _upsert_all(stub, data, 1_000)
        await stub.Search(requests[0])
        stop_at = time.perf_counter() + seconds

        async def caller(i: int) -> None:
            nonlocal done
            k = i
            while time.perf_counter() < stop_at:
                await stub.Search(requests[k % len(requests)])
                done += 1
                k += CALLERS

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        qps = done / (time.perf_counter() - started)
        found = []
        for request in requests[:RECALL_QUERIES]:
            response = await stub.Search(request)
            found.append([int(h.id) for h in response.hits])
    return upsert_s, qps, found


def h2load_search(target: str, query: Array, requests: int, tmp: Path) -> float:
    """Search q/s with the router pinned to core 0 and h2load (a C client, 64 in flight) on core
    1: the same one core the in-process baseline gets, without a Python client beside it."""
    message = pb.SearchRequest(collection=COLLECTION, vector=_vector(query), top_k=K, ef=EF)
    data = message.SerializeToString()
    body = tmp / "search.bin"
    body.write_bytes(struct.pack(">BI", 0, len(data)) + data)
    # h2load counts any HTTP 200 as success, even a gRPC error: prove the call works first.
    with grpc.insecure_channel(target) as channel:
        hits = pb_grpc.RetrievalServiceStub(channel).Search(message, timeout=10).hits
        assert len(hits) == K, hits
    pid = ROUTER_PIDS[target]
    subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, capture_output=True)
    return _h2load(f"http://{target}/irouter.v1.RetrievalService/Search", body, requests)


def recall_at_k(data: Array, queries: Array, found: list[list[int]]) -> float:
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :K]
    hits = sum(len(set(f) & set(e.tolist())) for f, e in zip(found, exact, strict=True))
    return hits / (K * len(found))


def bench_search(quick: bool) -> None:
    n = 20_000 if quick else 100_000
    seconds = 5.0 if quick else 10.0
    data = unit_vectors(n, seed=1)
    queries = unit_vectors(QUERIES, seed=2)
    build, bare, bare_found = bare_knn_qps(data, queries, seconds)
    line(f"bare hnswlib add_items, N={n} (M={M}, ef_c={EF_CONSTRUCTION})", n / build, "vec/s")
    line(f"bare hnswlib knn_query, 1 query/call, k={K} ef={EF}", bare, "q/s")
    with (
        tempfile.TemporaryDirectory() as tmp,
        router_process(config=write_config(Path(tmp))) as target,
    ):
        upsert_s, qps, found = asyncio.run(grpc_search(target, data, queries, seconds))
        h2 = h2load_search(target, queries[0], 5_000 if quick else 20_000, Path(tmp))
    line(f"Upsert through gRPC, N={n}, batches of 1000 (fsync on)", n / upsert_s, "vec/s")
    line(
        f"Search through gRPC, Python client ({CALLERS} callers) on the same 2 cores",
        qps,
        "q/s",
        bare,
    )
    line(
        "Search through gRPC, router on 1 core, h2load on the other", h2, "q/s", bare, "goal >= 0.8"
    )
    recall = recall_at_k(data, queries[:RECALL_QUERIES], found)
    bare_recall = recall_at_k(data, queries[:RECALL_QUERIES], bare_found)
    line(f"recall@{K} of bare hnswlib vs brute force, {RECALL_QUERIES} queries", bare_recall, "")
    line(
        f"recall@{K} of gRPC Search vs brute force, {RECALL_QUERIES} queries",
        recall,
        "",
        bare_recall,
        "vs bare hnswlib",
    )


# ---- upsert: fsync on vs off --------------------------------------------------------------------


async def _upsert_rate(target: str, data: Array, batch: int) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        return len(data) / await _upsert_all(stub, data, batch)


def bench_upsert(quick: bool) -> None:
    n, batch = 20_000, 500
    data = unit_vectors(n, seed=3)
    rates = {}
    for fsync in (False, True):
        with (
            tempfile.TemporaryDirectory() as tmp,
            router_process(config=write_config(Path(tmp), fsync=fsync)) as target,
        ):
            rates[fsync] = asyncio.run(_upsert_rate(target, data, batch))
    line(f"Upsert through gRPC, {n} vectors, batches of {batch}, fsync off", rates[False], "vec/s")
    line(
        f"Upsert through gRPC, {n} vectors, batches of {batch}, fsync on",
        rates[True],
        "vec/s",
        rates[False],
        "vs fsync off",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="N=20,000 and shorter runs")
    parser.add_argument("--only", choices=("search", "upsert"))
    args = parser.parse_args()
    cache = load_config().model_cache
    from router.models.prepare import prepare_models

    prepare_models(cache, progress=False)
    os.environ.setdefault("IROUTER_MODEL_CACHE", str(cache))
    print(f"# retrieval benchmarks, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.only in (None, "search"):
        bench_search(args.quick)
    if args.only in (None, "upsert"):
        bench_upsert(args.quick)


if __name__ == "__main__":
    main()

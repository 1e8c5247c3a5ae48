"""RetrievalService through a grpc.aio server with the real MiniLM model, and kill -9 durability."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from router.proto.irouter.v1 import retrieval_service_pb2 as pb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as pb_grpc
from router.retrieval.store import CollectionStore
from router.server import RouterServer
from router.services.retrieval import RetrievalServicer
from router.services.rpc import add_service
from router.telemetry import Metrics
from tests.integration.conftest import EMB

SENTENCES = {
    "paris": "Paris is the capital and largest city of France.",
    "python": "Python lists can be reversed in place with the reverse method.",
    "ocean": "The Pacific is the largest and deepest of the world's oceans.",
    "bread": "Knead the dough for ten minutes, then let it rise for an hour.",
}


@pytest.fixture(scope="module")
async def retrieval(
    router: RouterServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[pb_grpc.RetrievalServiceStub]:
    store = CollectionStore(tmp_path_factory.mktemp("collections"), fsync=False)
    await store.load()
    server = grpc.aio.server()
    add_service(
        server,
        pb.DESCRIPTOR.services_by_name["RetrievalService"],
        RetrievalServicer(store, router.models),
        Metrics(),
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.RetrievalServiceStub(channel)
    await server.stop(0)
    await store.close()


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def test_text_collection_life_cycle(retrieval: pb_grpc.RetrievalServiceStub) -> None:
    config = pb.CollectionConfig(name="docs", embedding_model=EMB)
    created = await retrieval.CreateCollection(pb.CreateCollectionRequest(config=config))
    assert created.collection.config.dimension == 384
    assert created.collection.config.metric == pb.METRIC_COSINE
    await retrieval.Upsert(
        pb.UpsertRequest(
            collection="docs",
            documents=[
                pb.Document(id=k, text=v, metadata={"kind": "fact" if k != "bread" else "recipe"})
                for k, v in SENTENCES.items()
            ],
        )
    )
    found = await retrieval.Search(
        pb.SearchRequest(collection="docs", text="What is France's capital city?", top_k=2)
    )
    assert found.hits[0].id == "paris" and found.hits[0].text == SENTENCES["paris"]
    assert found.hits[0].score > found.hits[1].score
    recipes = await retrieval.Search(
        pb.SearchRequest(
            collection="docs",
            text="capital of France",
            top_k=2,
            filter=pb.Filter(strings=[pb.StringCondition(field="kind", values=["recipe"])]),
        )
    )
    assert [h.id for h in recipes.hits] == ["bread"]
    described = await retrieval.DescribeCollection(pb.DescribeCollectionRequest(name="docs"))
    assert described.collection.document_count == 4
    deleted = await retrieval.Delete(pb.DeleteRequest(collection="docs", ids=["paris", "zzz"]))
    assert deleted.deleted == 1
    found = await retrieval.Search(
        pb.SearchRequest(collection="docs", text="What is France's capital city?", top_k=4)
    )
    assert "paris" not in [h.id for h in found.hits] and len(found.hits) == 3
    listed = await retrieval.ListCollections(pb.ListCollectionsRequest())
    assert "docs" in [c.config.name for c in listed.collections]
    await retrieval.DropCollection(pb.DropCollectionRequest(name="docs"))


async def test_bad_input_statuses(retrieval: pb_grpc.RetrievalServiceStub) -> None:
    config = pb.CollectionConfig(name="vec", dimension=3, metric=pb.METRIC_L2)
    await retrieval.CreateCollection(pb.CreateCollectionRequest(config=config))
    code, details = await status_of(
        retrieval.CreateCollection(pb.CreateCollectionRequest(config=config))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'vec' already exists" in details
    code, details = await status_of(
        retrieval.Search(pb.SearchRequest(collection="nope", vector=pb.Vector(values=[1]), top_k=1))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "'vec'" in details
    code, details = await status_of(
        retrieval.Upsert(
            pb.UpsertRequest(
                collection="vec", documents=[pb.Document(id="a", vector=pb.Vector(values=[1, 2]))]
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimension 2; collection 'vec' expects 3" in details
    code, details = await status_of(
        retrieval.Search(pb.SearchRequest(collection="vec", text="hello", top_k=1))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no embedding_model" in details
    vector = pb.Vector(values=[1, 2, 3])
    code, details = await status_of(
        retrieval.Search(pb.SearchRequest(collection="vec", vector=vector, top_k=0))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_k=0" in details
    bad = pb.Filter(ranges=[pb.RangeCondition(field="n", min=5, max=1)])
    code, details = await status_of(
        retrieval.Search(pb.SearchRequest(collection="vec", vector=vector, top_k=1, filter=bad))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "min=5.0 > max=1.0" in details
    code, details = await status_of(
        retrieval.CreateCollection(
            pb.CreateCollectionRequest(config=pb.CollectionConfig(name="x", embedding_model="gpt"))
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and "'gpt' is not served" in details
    await retrieval.DropCollection(pb.DropCollectionRequest(name="vec"))


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import numpy as np
    from router.retrieval.spec import CollectionSpec, Document
    from router.retrieval.store import CollectionStore

    async def main() -> None:
        store = CollectionStore(Path(sys.argv[1]), compact_after=7)
        await store.load()
        c = await store.create(CollectionSpec("k", 8))
        rng = np.random.default_rng(0)
        for i in range(100000):
            ids = [f"b{i}-{j}" for j in range(5)]
            await c.upsert([Document(x) for x in ids], rng.random((5, 8), dtype=np.float32))
            print(*ids, flush=True)

    asyncio.run(main())
    """
)


async def test_acknowledged_upserts_survive_kill_9(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    while len(acknowledged) < 300:  # several compactions have happened by then
        line = proc.stdout.readline()
        assert line, "the writer exited early"
        acknowledged.extend(line.split())
    proc.send_signal(signal.SIGKILL)
    acknowledged.extend(proc.stdout.read().split())  # acknowledged before the kill landed
    proc.wait()
    proc.stdout.close()
    store = CollectionStore(tmp_path)
    await asyncio.get_running_loop().run_in_executor(None, store.load_sync)
    collection = store.get("k")
    assert [i for i in acknowledged if i not in collection.index] == []
    await store.close()

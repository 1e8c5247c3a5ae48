"""RetrievalService through a grpc.aio server with the real MiniLM model, and kill -9 durability."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from router.proto.irouter.v1 import retrieval_service_pb2 as pb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as pb_grpc
from router.retrieval.store import CollectionStore
from router.server import RouterServer
from router.services.retrieval import RetrievalServicer
from router.services.rpc import add_service
from router.serving import embedding
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
        RetrievalServicer(store, router.models, router.embedder),
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


# ---- recall on real embeddings ---------------------------------------------------------------

_DOC_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "datetime",
    "decimal",
    "functools",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "re",
    "shutil",
    "subprocess",
    "textwrap",
    "typing",
    "unittest",
    "zipfile",
)


def stdlib_sentences() -> list[str]:
    """Sentences of 5 to 60 words from the docstrings of a few stdlib modules, deduplicated and
    sorted (deterministic for one Python version)."""
    found: set[str] = set()
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        objects: list[object] = [module, *(getattr(module, a, None) for a in sorted(dir(module)))]
        for obj in list(objects):
            if inspect.isclass(obj):
                objects.extend(v for _, v in sorted(vars(obj).items()))
        for obj in objects:
            try:
                doc = inspect.getdoc(obj)
            except Exception:  # odd descriptors
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                if 5 <= len(sentence.split()) <= 60:
                    found.add(sentence)
    return sorted(found)


async def embed_all(router: RouterServer, texts: list[str]) -> np.ndarray:
    models = router.models
    model = models.get(EMB, "embed")
    step = model.config.max_batch
    parts = []
    for start in range(0, len(texts), step):
        pieces = embedding.encode_texts(model, texts[start : start + step])
        parts.append(await embedding.embed_pieces(model, pieces))
    return np.concatenate(parts).astype(np.float32)


async def test_recall_at_10_on_stdlib_docstrings(
    router: RouterServer, retrieval: pb_grpc.RetrievalServiceStub
) -> None:
    model = router.models.get(EMB, "embed")
    assert model.tokenizer is not None
    sentences = [
        s for s in stdlib_sentences() if len(model.tokenizer.encode(s).ids) <= model.context_length
    ]
    assert len(sentences) >= 2100, len(sentences)
    pool = sentences[:: len(sentences) // 2100][:2100]  # spread over the sorted list
    queries = pool[::21]  # 100 held-out sentences, never indexed
    docs = [s for i, s in enumerate(pool) if i % 21][:2000]
    assert (len(docs), len(queries)) == (2000, 100)
    vectors = await embed_all(router, docs + queries)
    doc_vectors, query_vectors = vectors[:2000], vectors[2000:]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)

    config = pb.CollectionConfig(name="stdlib", embedding_model=EMB)  # every default: cosine, ef 64
    created = await retrieval.CreateCollection(pb.CreateCollectionRequest(config=config))
    default_ef = created.collection.config.ef
    for start in range(0, 2000, 500):
        await retrieval.Upsert(
            pb.UpsertRequest(
                collection="stdlib",
                documents=[
                    pb.Document(id=str(i), vector=pb.Vector(values=doc_vectors[i].tolist()))
                    for i in range(start, start + 500)
                ],
            )
        )
    exact = np.argsort(-(query_vectors @ doc_vectors.T), axis=1, kind="stable")[:, :10]

    async def recall(ef: int | None) -> float:
        found = 0
        for q, truth in zip(query_vectors, exact, strict=True):
            request = pb.SearchRequest(
                collection="stdlib", vector=pb.Vector(values=q.tolist()), top_k=10, ef=ef
            )
            hits = (await retrieval.Search(request)).hits
            found += len({int(h.id) for h in hits} & set(truth.tolist()))
        return found / (10 * len(exact))

    measured = {16: await recall(16)}  # once: ef 10 0.934, 16 ~0.98, 32 0.997
    measured[default_ef] = await recall(None)
    print(f"recall@10 by ef on {len(docs)} stdlib sentences: {measured}")
    assert measured[default_ef] >= 0.95, measured
    await retrieval.DropCollection(pb.DropCollectionRequest(name="stdlib"))


# ---- chunking --------------------------------------------------------------------------------

_BAKING = (
    "Mix the flour, water, salt and yeast in a large bowl until no dry flour remains. "
    "Knead the dough on a floured table for ten minutes until it is smooth and elastic. "
    "Cover the bowl with a damp towel and let the dough rise in a warm place for an hour. "
)
_ASTRONOMY = (
    "Jupiter is the largest planet in the solar system and a gas giant. "
    "Its Great Red Spot is a storm larger than the Earth that has raged for centuries. "
    "Galileo discovered its four largest moons with a small telescope in 1610. "
)


async def test_long_texts_are_chunked_with_parents(
    router: RouterServer, retrieval: pb_grpc.RetrievalServiceStub
) -> None:
    model = router.models.get(EMB, "embed")
    assert model.tokenizer is not None
    long_text = _BAKING * 6 + _ASTRONOMY * 6  # baking first, astronomy in the later chunks
    assert len(model.tokenizer.encode(long_text).ids) > 2 * model.context_length
    config = pb.CollectionConfig(name="chunks", embedding_model=EMB)
    await retrieval.CreateCollection(pb.CreateCollectionRequest(config=config))
    upserted = await retrieval.Upsert(
        pb.UpsertRequest(
            collection="chunks",
            documents=[
                pb.Document(id="book", text=long_text, metadata={"shelf": "mixed"}),
                pb.Document(id="paris", text=SENTENCES["paris"]),
            ],
        )
    )
    assert upserted.upserted == 2
    described = await retrieval.DescribeCollection(pb.DescribeCollectionRequest(name="chunks"))
    n_chunks = described.collection.document_count - 1
    assert n_chunks >= 3

    found = await retrieval.Search(
        pb.SearchRequest(collection="chunks", text="bread and planets", top_k=1000)
    )
    chunks = sorted(
        (h for h in found.hits if h.id != "paris"), key=lambda h: int(h.id.split("#")[1])
    )
    assert [h.id for h in chunks] == [f"book#{n}" for n in range(n_chunks)]
    assert all(h.metadata == {"parent_id": "book", "shelf": "mixed"} for h in chunks)
    assert all(h.text in long_text for h in chunks)
    assert chunks[0].text.startswith("Mix the flour") and long_text.rstrip().endswith(
        chunks[-1].text
    )
    for a, b in itertools.pairwise(chunks):  # ~32 tokens of overlap
        assert a.text[-40:] in b.text[:400]
        tokens = len(model.tokenizer.encode(a.text).ids)
        assert tokens <= model.context_length + 2  # + 2: a word cut at the start may re-split

    for query, topic in (("How long does the dough rise?", "dough"), ("Moons of Jupiter", "moons")):
        hit = (
            await retrieval.Search(pb.SearchRequest(collection="chunks", text=query, top_k=1))
        ).hits[0]
        assert hit.metadata["parent_id"] == "book" and topic in hit.text, (query, hit.id)
    paris = await retrieval.Search(
        pb.SearchRequest(collection="chunks", text="capital of France", top_k=1)
    )
    assert paris.hits[0].id == "paris" and "parent_id" not in paris.hits[0].metadata

    # Re-upserting the parent as a short text replaces all its chunks.
    await retrieval.Upsert(
        pb.UpsertRequest(collection="chunks", documents=[pb.Document(id="book", text=_BAKING)])
    )
    described = await retrieval.DescribeCollection(pb.DescribeCollectionRequest(name="chunks"))
    assert described.collection.document_count == 2
    await retrieval.Upsert(
        pb.UpsertRequest(collection="chunks", documents=[pb.Document(id="book", text=long_text)])
    )
    deleted = await retrieval.Delete(pb.DeleteRequest(collection="chunks", ids=["book"]))
    assert deleted.deleted == n_chunks
    found = await retrieval.Search(pb.SearchRequest(collection="chunks", text="dough", top_k=10))
    assert [h.id for h in found.hits] == ["paris"]
    await retrieval.DropCollection(pb.DropCollectionRequest(name="chunks"))

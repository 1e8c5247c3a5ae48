"""InferenceService through a real in-process server with the real prepared models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokenizers import Tokenizer

from backends.onnx_runtime import OnnxDecoder, OnnxEncoder
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN, wait_drained
from tests.integration.greedy import check_same_or_near_tie

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]


def chat(text: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)])


def greedy(max_tokens: int, **extra: object) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference_decoder(model_cache: Path) -> OnnxDecoder:
    return OnnxDecoder(model_cache / GEN, max_slots=1, max_context=256, threads=1)


def bare_greedy(decoder: OnnxDecoder, prompt_ids: list[int], n: int, stop: set[int]) -> list[int]:
    """The same model driven by hand: prefill, then argmax decode, no scheduler, no sampler."""
    logits = decoder.prefill(0, np.array(prompt_ids, dtype=np.int64), 0)
    out: list[int] = []
    pos = len(prompt_ids)
    for _ in range(n):
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop:
            break
        logits = decoder.decode(
            np.array([0], dtype=np.int32),
            np.array([token], dtype=np.int64),
            np.array([pos], dtype=np.int32),
        )[0]
        pos += 1
    return out


async def test_list_models_reports_context_limits(stub: pb_grpc.InferenceServiceStub) -> None:
    response = await stub.ListModels(pb.ListModelsRequest())
    models = {m.name: m for m in response.models}
    assert set(models) == {GEN, EMB}
    assert models[GEN].kind == pb.MODEL_KIND_GENERATE and models[GEN].context_length == 1024
    assert models[EMB].kind == pb.MODEL_KIND_EMBED and models[EMB].dimension == 384
    assert models[EMB].context_length > 0
    assert all(m.ready for m in response.models)


async def test_generate_streams_tokens_and_ends_with_usage(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    chunks = [
        c
        async for c in stub.Generate(
            pb.GenerateRequest(
                model=GEN, chat=chat(PROMPTS[0]), sampling=greedy(24), return_token_ids=True
            )
        )
    ]
    assert len(chunks) >= 2
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    completion = sum(len(c.token_ids) for c in chunks)
    assert last.usage.completion_tokens == completion
    assert last.usage.prompt_tokens > 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + completion
    assert "Paris" in "".join(c.text for c in chunks)
    assert len({c.id for c in chunks}) == 1


async def test_greedy_complete_equals_bare_onnx_loop(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub, reference_decoder: OnnxDecoder
) -> None:
    model = router.models.get(GEN, "generate")
    assert model.tokenizer is not None
    stop = {int(i) for i in model.manifest["stop_token_ids"]}
    for prompt in PROMPTS[:2]:
        response = await stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                prompt=prompt,
                sampling=greedy(20),
                return_token_ids=True,
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
        )
        ids = model.tokenizer.encode(prompt, add_special_tokens=False).ids
        assert list(response.token_ids) == bare_greedy(reference_decoder, ids, 20, stop)
        assert response.usage.prompt_tokens == len(ids)


async def test_concurrent_streams_match_their_solo_output(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub, reference_decoder: OnnxDecoder
) -> None:
    """Continuous batching must not change what a sequence generates, but for near-ties
    (tests/integration/greedy.py)."""
    model = router.models.get(GEN, "generate")
    assert model.tokenizer is not None

    async def complete(prompt: str) -> list[int]:
        r = await stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                chat=chat(prompt),
                sampling=greedy(24),
                return_token_ids=True,
                cache_mode=pb.CACHE_MODE_BYPASS,  # this tests the engine's batching
            )
        )
        return list(r.token_ids)

    solo = {p: await complete(p) for p in PROMPTS}
    together = await asyncio.gather(*(complete(p) for p in PROMPTS * 3))
    exact = sum(
        check_same_or_near_tie(model, reference_decoder, prompt, got, solo[prompt])
        for prompt, got in zip(PROMPTS * 3, together, strict=True)
    )
    assert exact >= len(together) // 2


async def test_streamed_text_is_the_decoded_tokens(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    """Characters spanning several tokens (emoji, CJK) arrive whole, and nothing is lost."""
    tokenizer = router.models.get(GEN, "generate").tokenizer
    assert isinstance(tokenizer, Tokenizer)
    request = pb.GenerateRequest(
        model=GEN,
        chat=chat("Reply with five different emoji and the word 東京."),
        sampling=pb.SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True),
        return_token_ids=True,
    )
    chunks = [c async for c in stub.Generate(request)]
    ids = [t for c in chunks for t in c.token_ids]
    assert "".join(c.text for c in chunks) == tokenizer.decode(ids)


async def test_seed_makes_sampling_reproducible(stub: pb_grpc.InferenceServiceStub) -> None:
    # One at a time: int4 MatMulNBits logits move slightly with the batch's other rows, which
    # can flip a sampled token, so a seed reproduces a run at the same batch composition.
    # The cache is bypassed: a seeded request is cacheable, and this tests the engine.
    def req(seed: int) -> pb.CompleteRequest:
        return pb.CompleteRequest(
            model=GEN,
            chat=chat("Tell me a story about a dragon."),
            sampling=pb.SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )

    a = await stub.Complete(req(1))
    b = await stub.Complete(req(1))
    c = await stub.Complete(req(2))
    assert a.cache_status == b.cache_status == pb.CACHE_STATUS_UNSPECIFIED
    assert a.text == b.text
    assert a.text != c.text


async def test_stop_string_and_stop_token(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    base = await stub.Complete(
        pb.CompleteRequest(
            model=GEN, chat=chat(PROMPTS[0]), sampling=greedy(24), return_token_ids=True
        )
    )
    assert "Paris" in base.text
    cut = await stub.Complete(
        pb.CompleteRequest(model=GEN, chat=chat(PROMPTS[0]), sampling=greedy(24, stop=["Paris"]))
    )
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == base.text[: base.text.index("Paris")]
    third = base.token_ids[2]
    by_id = await stub.Complete(
        pb.CompleteRequest(
            model=GEN,
            chat=chat(PROMPTS[0]),
            sampling=greedy(24, stop_token_ids=[third]),
            return_token_ids=True,
        )
    )
    assert list(by_id.token_ids) == list(base.token_ids[:3])
    assert by_id.finish_reason == pb.FINISH_REASON_STOP


async def test_max_tokens_ends_with_length(stub: pb_grpc.InferenceServiceStub) -> None:
    r = await stub.Complete(
        pb.CompleteRequest(
            model=GEN,
            prompt="Once upon a time",
            sampling=greedy(5, ignore_eos=True),
            return_token_ids=True,
        )
    )
    assert r.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(r.token_ids) == 5 == r.usage.completion_tokens


async def test_embed_matches_the_bare_encoder(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub, model_cache: Path
) -> None:
    texts = ["The cat sat on the mat.", "A quick brown fox", "Quantum chromodynamics"]
    response = await stub.Embed(pb.EmbedRequest(model=EMB, texts=texts))
    got = np.array([e.values for e in response.embeddings], dtype=np.float32)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tokenizer = router.models.get(EMB, "embed").tokenizer
    assert tokenizer is not None
    encoder = OnnxEncoder(model_cache / EMB, threads=1)
    for text, vector in zip(texts, got, strict=True):
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        alone = encoder.encode(ids, np.ones_like(ids))[0]
        np.testing.assert_allclose(vector, alone, atol=1e-4)
    assert response.usage.prompt_tokens > 3 * 3


async def test_concurrent_embed_callers_get_their_own_vectors(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(40)]
    solo = await stub.Embed(pb.EmbedRequest(model=EMB, texts=texts[:1]))
    many = await asyncio.gather(*(stub.Embed(pb.EmbedRequest(model=EMB, texts=[t])) for t in texts))
    np.testing.assert_allclose(many[0].embeddings[0].values, solo.embeddings[0].values, atol=1e-4)
    vectors = np.array([m.embeddings[0].values for m in many])
    assert len({tuple(np.round(v, 3)) for v in vectors}) == len(texts)


# ---- bad input: each a named status, and the server keeps serving ------------------------------


async def _status(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_unknown_model_lists_the_served_ones(stub: pb_grpc.InferenceServiceStub) -> None:
    err = await _status(stub.Complete(pb.CompleteRequest(model="gpt-9", prompt="hi")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'gpt-9'" in (err.details() or "") and GEN in (err.details() or "")
    err = await _status(stub.Embed(pb.EmbedRequest(model=GEN, texts=["x"])))
    assert err.code() == grpc.StatusCode.NOT_FOUND and EMB in (err.details() or "")


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (pb.SamplingParams(temperature=5.0), "sampling.temperature"),
        (pb.SamplingParams(top_p=0.0), "sampling.top_p"),
        (pb.SamplingParams(min_p=1.5), "sampling.min_p"),
        (pb.SamplingParams(repetition_penalty=0.0), "sampling.repetition_penalty"),
        (pb.SamplingParams(presence_penalty=3.0), "sampling.presence_penalty"),
        (pb.SamplingParams(top_k=10**6), "sampling.top_k"),
        (pb.SamplingParams(max_tokens=0), "sampling.max_tokens"),
        (pb.SamplingParams(stop_token_ids=[10**6]), "sampling.stop_token_ids"),
    ],
)
async def test_out_of_range_sampling_names_the_field(
    stub: pb_grpc.InferenceServiceStub, sampling: pb.SamplingParams, field: str
) -> None:
    err = await _status(
        stub.Complete(pb.CompleteRequest(model=GEN, prompt="hi", sampling=sampling))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")
    status = rpc_status.from_call(err)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field


async def test_prompt_plus_max_tokens_beyond_context(stub: pb_grpc.InferenceServiceStub) -> None:
    err = await _status(
        stub.Complete(
            pb.CompleteRequest(
                model=GEN, prompt="hello there", sampling=pb.SamplingParams(max_tokens=1023)
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens=1023" in (err.details() or "") and "1024" in (err.details() or "")
    err = await _status(stub.Complete(pb.CompleteRequest(model=GEN, prompt="word " * 1100)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt has" in (err.details() or "")


async def test_empty_and_missing_input(stub: pb_grpc.InferenceServiceStub) -> None:
    for request, word in [
        (pb.CompleteRequest(model=GEN), "prompt or chat"),
        (pb.CompleteRequest(model=GEN, prompt=""), "prompt is empty"),
        (pb.CompleteRequest(model=GEN, chat=pb.ChatMessages()), "chat.messages is empty"),
        (
            pb.CompleteRequest(
                model=GEN,
                chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")]),
            ),
            "role='robot'",
        ),
    ]:
        err = await _status(stub.Complete(request))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert word in (err.details() or ""), err.details()
    err = await _status(stub.Embed(pb.EmbedRequest(model=EMB)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "texts is empty" in (
        err.details() or ""
    )
    err = await _status(stub.Embed(pb.EmbedRequest(model=EMB, texts=["a"] * 17)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 16" in (err.details() or "")
    err = await _status(stub.Embed(pb.EmbedRequest(model=EMB, texts=["ok", ""])))
    assert "texts[1] is empty" in (err.details() or "")


async def test_bytes_that_are_not_a_message_or_not_utf8(channel: grpc.aio.Channel) -> None:
    raw = channel.unary_unary("/irouter.v1.InferenceService/Complete")
    err = await _status(raw(b"\xff\xff\xff\xff"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "irouter.v1.CompleteRequest" in (err.details() or "")
    # field 2 (prompt), wire type 2, length 2, bytes that are not UTF-8
    err = await _status(raw(b"\x0a\x01x\x12\x02\xc3\x28"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_message_over_the_limit_is_resource_exhausted(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    err = await _status(stub.Embed(pb.EmbedRequest(model=EMB, texts=["x" * 100_000])))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_server_still_serves_after_bad_input(stub: pb_grpc.InferenceServiceStub) -> None:
    r = await stub.Complete(pb.CompleteRequest(model=GEN, prompt="Hello", sampling=greedy(3)))
    assert r.usage.completion_tokens >= 1


# ---- cancellation, deadlines, load shedding -------------------------------------------------


async def test_client_cancel_frees_the_slot(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    call = stub.Generate(
        pb.GenerateRequest(model=GEN, prompt="Count slowly:", sampling=greedy(500, ignore_eos=True))
    )
    async for _ in call:
        break
    call.cancel()
    await wait_drained(router)


async def test_deadline_frees_the_slot(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    err = await _status(
        stub.Complete(
            pb.CompleteRequest(model=GEN, prompt="Count:", sampling=greedy(500, ignore_eos=True)),
            timeout=0.3,
        )
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_drained(router)


async def test_full_queue_sheds_with_retry_info(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    engine = router.models.get(GEN, "generate").engine
    assert engine is not None
    request = pb.GenerateRequest(model=GEN, prompt="Go on:", sampling=greedy(300, ignore_eos=True))
    calls = [stub.Generate(request) for _ in range(8 + 8)]  # max_slots + max_waiting

    async def drain(call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
        async for _ in call:
            pass

    tasks = [asyncio.ensure_future(drain(c)) for c in calls]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while engine.num_unfinished < 16 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    err = await _status(stub.Complete(pb.CompleteRequest(model=GEN, prompt="one more")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() > 0
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_drained(router)


async def test_high_priority_preempts_low_when_slots_are_full(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    engine = router.models.get(GEN, "generate").engine
    assert engine is not None
    finished: list[str] = []

    async def run(name: str, priority: int, n: int) -> pb.CompleteResponse:
        r = await stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                prompt=f"Story {name}:",
                priority=priority,  # type: ignore[arg-type]
                sampling=greedy(n, ignore_eos=True),
                return_token_ids=True,
            )
        )
        finished.append(name)
        return r

    low = [asyncio.ensure_future(run(f"low{i}", pb.PRIORITY_LOW, 60)) for i in range(8)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while engine.num_active < 8 and loop.time() < deadline:
        await asyncio.sleep(0.005)
    high = await run("high", pb.PRIORITY_HIGH, 4)
    assert high.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished[0] == "high", finished
    results = await asyncio.gather(*low)
    # The preempted sequence was recomputed, not truncated or repeated.
    assert all(len(r.token_ids) == 60 == r.usage.completion_tokens for r in results)
    await wait_drained(router)

"""Big inputs against a real router (issue 17, items 1 and 5): a prompt whose size alone proves it
cannot fit is refused before any tokenizing, a long one is tokenized while the server keeps
answering, every call gets (and is counted with) its status, and a document over
`retrieval.max_text_bytes` is refused rather than embedded past the caller's deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc
from router.server import RouterServer
from router.services import rpc
from router.serving import tokenize
from tests.integration.conftest import EMB, GEN, make_config, running

CONTEXT = 256
MAX_TEXT_BYTES = 4096
HUGE = 3_900_000  # just under max_message_bytes, as in the campaign


@pytest.fixture(scope="module")
async def big_router(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("collections"),
        ModelConfig(
            name=GEN,
            kind="generate",
            artifact=GEN,
            max_slots=2,
            max_context=CONTEXT,
            default_max_tokens=16,
        ),
        ModelConfig(name=EMB, kind="embed", artifact=EMB, max_batch=8),
        fsync=False,
        server={"max_message_bytes": 4 * 1024 * 1024},
    )
    retrieval = dataclasses.replace(config.retrieval, max_text_bytes=MAX_TEXT_BYTES)
    async with running(dataclasses.replace(config, retrieval=retrieval)) as server:
        yield server


@pytest.fixture(scope="module")
async def channel(big_router: RouterServer) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{big_router.port}", options=options) as ch:
        yield ch


def _count(router: RouterServer, method: str, code: str) -> float:
    value = router.metrics.registry.get_sample_value(
        "irouter_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_sixteen_huge_prompts_are_refused_while_the_server_answers(
    big_router: RouterServer, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    before = _count(big_router, "InferenceService/Complete", "INVALID_ARGUMENT")
    huge = "All work and no play makes Jack a dull boy. " * (HUGE // 44)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=huge)])
    calls = [
        stub.Complete(
            pb.CompleteRequest(model=GEN, prompt=huge)
            if i % 2
            else pb.CompleteRequest(model=GEN, chat=chat),
            timeout=120,
        )
        for i in range(16)
    ]
    listed = [stub.ListModels(pb.ListModelsRequest(), timeout=120) for _ in range(16)]
    results = await asyncio.gather(*(_code(c) for c in calls))
    for code, details in results:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "bytes, hence at least" in details and f"at most {CONTEXT - 1}" in details, details
    for answer in await asyncio.gather(*listed):
        assert {m.name for m in answer.models} == {GEN, EMB}
    # Every call has its status on the server too (none vanished as CANCELLED).
    assert _count(big_router, "InferenceService/Complete", "INVALID_ARGUMENT") == before + 16


async def test_a_long_prompt_under_the_size_bound_is_tokenized_and_counted(
    big_router: RouterServer, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    model = big_router.models.get(GEN, "generate")
    room = (CONTEXT - 1) * model.max_token_bytes
    # Longer than what is tokenized inline, within the size bound: the tokenizer decides.
    prompt = ("0123456789 " * room)[: min(room, tokenize.OFF_LOOP_CHARS * 2)]
    assert len(prompt) > tokenize.OFF_LOOP_CHARS
    code, details = await _code(stub.Complete(pb.CompleteRequest(model=GEN, prompt=prompt)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "the prompt has" in details and "tokens" in details, details


async def test_a_document_over_max_text_bytes_is_refused_by_name(
    channel: grpc.aio.Channel,
) -> None:
    stub = rpb_grpc.RetrievalServiceStub(channel)
    config = rpb.CollectionConfig(name="big-docs", embedding_model=EMB)
    await stub.CreateCollection(rpb.CreateCollectionRequest(config=config))
    fits = "Paris is the capital of France. " * (MAX_TEXT_BYTES // 40)
    too_big = "x" * (MAX_TEXT_BYTES + 1)
    code, details = await _code(
        stub.Upsert(
            rpb.UpsertRequest(
                collection="big-docs",
                documents=[
                    rpb.Document(id="ok", text=fits),
                    rpb.Document(id="huge", text=too_big),
                ],
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[1].text" in details and "'huge'" in details, details
    assert "retrieval.max_text_bytes" in details and str(MAX_TEXT_BYTES) in details
    described = await stub.DescribeCollection(rpb.DescribeCollectionRequest(name="big-docs"))
    assert described.collection.document_count == 0  # nothing half-stored
    # A document within the limit but over the encoder's window is chunked, off the loop.
    await stub.Upsert(
        rpb.UpsertRequest(collection="big-docs", documents=[rpb.Document(id="ok", text=fits)])
    )
    described = await stub.DescribeCollection(rpb.DescribeCollectionRequest(name="big-docs"))
    assert described.collection.document_count > 1


async def test_an_embed_text_too_big_for_the_window_is_refused_from_its_size(
    channel: grpc.aio.Channel, big_router: RouterServer
) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    encoder = big_router.models.get(EMB, "embed")
    size = encoder.context_length * encoder.max_token_bytes + 1
    code, details = await _code(stub.Embed(pb.EmbedRequest(model=EMB, texts=["ok", "y" * size])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1] has" in details and "bytes, hence at least" in details, details


async def test_a_huge_prompt_is_refused_from_its_wire_size_without_decoding_it(
    channel: grpc.aio.Channel,
) -> None:
    """The refusal counts the prompt's UTF-8 bytes from the request's length prefixes
    (router.services.wire_text): 2 bytes per "é", where a count of the decoded str would give
    its characters."""
    stub = pb_grpc.InferenceServiceStub(channel)
    chars = HUGE // 2
    for request in (
        pb.CompleteRequest(model=GEN, prompt="é" * chars),
        pb.CompleteRequest(
            model=GEN,
            chat=pb.ChatMessages(
                messages=[pb.ChatMessage(role="user", content="é" * (chars // 2))] * 2
            ),
        ),
    ):
        code, details = await _code(stub.Complete(request, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"has at least {2 * chars} bytes" in details, details


async def test_a_big_request_is_parsed_off_the_loop_and_a_malformed_one_refused_by_name(
    channel: grpc.aio.Channel, big_router: RouterServer
) -> None:
    assert HUGE > rpc.OFF_LOOP_BYTES
    raw = channel.unary_unary(
        "/irouter.v1.InferenceService/Complete",
        request_serializer=lambda data: data,
        response_deserializer=pb.CompleteResponse.FromString,
    )
    valid = pb.CompleteRequest(model=GEN, prompt="x " * (HUGE // 2)).SerializeToString()
    broken = b"\x0a\x01\xff" + valid  # a model name that is not UTF-8
    code, details = await _code(raw(broken, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid irouter.v1.CompleteRequest message" in details, details
    code, details = await _code(raw(valid, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes, hence at least" in details


async def test_the_big_request_parse_runs_on_the_worker_thread() -> None:
    threads: list[str] = []

    def parse(data: bytes) -> pb.ListModelsRequest:
        threads.append(threading.current_thread().name)
        return pb.ListModelsRequest.FromString(data)

    parsed = await rpc.Unparsed(b"", parse).parsed()
    assert isinstance(parsed, pb.ListModelsRequest)
    assert threads[0].startswith("irouter-offload") and threads[0] != "MainThread"

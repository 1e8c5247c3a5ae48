"""Heavy or hostile input through the real server (issue 17): refused by name, bounded in what
errors quote back, nothing half-stored, and every call counted with its real status."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from router.errors import MAX_MESSAGE_BYTES
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc
from router.scheduler.request import MAX_STOP_CHARS, MAX_STOPS
from router.server import RouterServer
from tests.integration.conftest import GEN

COSINE = "hardening-cosine"
L2 = "hardening-l2"
NAN = math.nan
INF = math.inf


async def _status(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


@pytest.fixture(scope="module")
async def collections(channel: grpc.aio.Channel) -> rpb_grpc.RetrievalServiceStub:
    stub = rpb_grpc.RetrievalServiceStub(channel)
    for name, metric in ((COSINE, rpb.METRIC_COSINE), (L2, rpb.METRIC_L2)):
        config = rpb.CollectionConfig(name=name, dimension=4, metric=metric)
        await stub.CreateCollection(rpb.CreateCollectionRequest(config=config))
    await stub.Upsert(
        rpb.UpsertRequest(
            collection=COSINE,
            documents=[
                rpb.Document(id=f"d{i}", vector=rpb.Vector(values=[1.0, i, 0.5, -i]))
                for i in range(8)
            ],
        )
    )
    return stub


async def _count(stub: rpb_grpc.RetrievalServiceStub, name: str) -> int:
    info = await stub.DescribeCollection(rpb.DescribeCollectionRequest(name=name))
    return info.collection.document_count


@pytest.mark.parametrize(
    ("values", "position", "what"),
    [
        ([NAN, NAN, NAN, NAN], 0, "NaN"),
        ([1.0, INF, 1.0, 1.0], 1, "infinite"),
        ([1.0, 1.0, 1.0, -INF], 3, "infinite"),
        ([0.0, 0.0, 0.0, 0.0], None, "zero"),
    ],
)
async def test_bad_vectors_are_refused_naming_document_and_position(
    collections: rpb_grpc.RetrievalServiceStub,
    values: list[float],
    position: int | None,
    what: str,
) -> None:
    before = await _count(collections, COSINE)
    err = await _status(
        collections.Upsert(
            rpb.UpsertRequest(
                collection=COSINE,
                documents=[
                    rpb.Document(id="fine", vector=rpb.Vector(values=[1.0, 2.0, 3.0, 4.0])),
                    rpb.Document(id="bad", vector=rpb.Vector(values=values)),
                ],
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert "documents[1].vector" in details and "'bad'" in details and what in details
    if position is not None:
        assert f"[{position}]" in details
    assert await _count(collections, COSINE) == before  # nothing of the call was stored


async def test_a_zero_vector_is_a_point_under_l2(
    collections: rpb_grpc.RetrievalServiceStub,
) -> None:
    origin = rpb.Document(id="origin", vector=rpb.Vector(values=[0.0, 0.0, 0.0, 0.0]))
    await collections.Upsert(rpb.UpsertRequest(collection=L2, documents=[origin]))
    assert await _count(collections, L2) == 1


@pytest.mark.parametrize("values", [[NAN, 1.0, 1.0, 1.0], [1.0, 1.0, INF, 1.0], [0.0] * 4])
async def test_bad_query_vectors_are_refused(
    collections: rpb_grpc.RetrievalServiceStub, values: list[float]
) -> None:
    err = await _status(
        collections.Search(
            rpb.SearchRequest(collection=COSINE, vector=rpb.Vector(values=values), top_k=3)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vector" in (err.details() or "")


async def test_search_scores_stay_finite(collections: rpb_grpc.RetrievalServiceStub) -> None:
    found = await collections.Search(
        rpb.SearchRequest(collection=COSINE, vector=rpb.Vector(values=[1, 2, 3, 4]), top_k=8)
    )
    assert len(found.hits) == 8 and all(math.isfinite(h.score) for h in found.hits)


@pytest.mark.parametrize("bound", ["min", "max"])
async def test_nan_filter_bounds_are_refused(
    collections: rpb_grpc.RetrievalServiceStub, bound: str
) -> None:
    condition = rpb.RangeCondition(field="year", **{bound: NAN})
    err = await _status(
        collections.Search(
            rpb.SearchRequest(
                collection=COSINE,
                vector=rpb.Vector(values=[1, 2, 3, 4]),
                top_k=3,
                filter=rpb.Filter(ranges=[condition]),
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"filter.ranges[0].{bound}" in (err.details() or "")


async def test_nan_numeric_metadata_is_refused(
    collections: rpb_grpc.RetrievalServiceStub,
) -> None:
    doc = rpb.Document(
        id="n", vector=rpb.Vector(values=[1, 1, 1, 1]), numeric_metadata={"year": NAN}
    )
    err = await _status(collections.Upsert(rpb.UpsertRequest(collection=COSINE, documents=[doc])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[0].numeric_metadata['year']" in (err.details() or "")


async def test_nan_min_score_is_refused(stub: pb_grpc.InferenceServiceStub) -> None:
    err = await _status(
        stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                prompt="hi",
                retrieval=pb.RetrievalOptions(collection=COSINE, min_score=NAN),
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "retrieval.min_score" in (err.details() or "")


@pytest.mark.parametrize("length", [200, 8_000, 40_000])
async def test_errors_quote_a_bounded_prefix_of_client_values(
    stub: pb_grpc.InferenceServiceStub, collections: rpb_grpc.RetrievalServiceStub, length: int
) -> None:
    name = "m" * length
    err = await _status(stub.Complete(pb.CompleteRequest(model=name, prompt="hi")))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED (metadata too big)
    details = err.details() or ""
    assert "mmmm" in details and len(details.encode()) <= MAX_MESSAGE_BYTES
    if length > 200:
        assert f"{length} characters" in details  # says it quoted a part
    err = await _status(collections.Search(rpb.SearchRequest(collection=name, top_k=1)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert len((err.details() or "").encode()) <= MAX_MESSAGE_BYTES


async def test_a_long_error_message_is_cut_not_lost(stub: pb_grpc.InferenceServiceStub) -> None:
    # Filter field names are quoted in full inside a longer message; the status still arrives.
    long_field = "f" * 30_000
    err = await _status(
        stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                prompt="hi",
                retrieval=pb.RetrievalOptions(
                    collection=COSINE,
                    filter=rpb.Filter(ranges=[rpb.RangeCondition(field=long_field)]),
                ),
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len((err.details() or "").encode()) <= MAX_MESSAGE_BYTES


@pytest.mark.parametrize(
    "stop",
    [["x"] * (MAX_STOPS + 1), ["y" * (MAX_STOP_CHARS + 1)], ["z" * 60_000]],
    ids=["too-many", "too-long", "sixty-thousand-characters"],
)
async def test_stop_lists_are_bounded(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub, stop: list[str]
) -> None:
    err = await _status(
        stub.Complete(
            pb.CompleteRequest(model=GEN, prompt="hi", sampling=pb.SamplingParams(stop=stop))
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.stop" in (err.details() or "")


def _requests(router: RouterServer, method: str, code: str) -> float:
    value = router.metrics.registry.get_sample_value(
        "irouter_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


async def test_a_deadline_expiry_is_counted_as_deadline_exceeded(
    router: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    method = "InferenceService/Complete"
    before = _requests(router, method, "DEADLINE_EXCEEDED"), _requests(router, method, "CANCELLED")
    err = await _status(
        stub.Complete(
            pb.CompleteRequest(
                model=GEN,
                prompt="Count:",
                sampling=pb.SamplingParams(max_tokens=500, ignore_eos=True),
                cache_mode=pb.CACHE_MODE_BYPASS,
            ),
            timeout=0.3,
        )
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server records the call when its handler ends, just after the client gave up.
    for _ in range(200):
        after = _requests(router, method, "DEADLINE_EXCEEDED")
        if after > before[0]:
            break
        await asyncio.sleep(0.025)
    assert after == before[0] + 1
    assert _requests(router, method, "CANCELLED") == before[1]


async def test_model_and_task_together_are_invalid_without_routing(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    err = await _status(stub.Complete(pb.CompleteRequest(model=GEN, task="chat", prompt="hi")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in (err.details() or "")
    err = await _status(stub.Complete(pb.CompleteRequest(task="chat", prompt="hi")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "routes no tasks" in (err.details() or "")

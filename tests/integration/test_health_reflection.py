"""Per-model health and server reflection on the in-process server."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.conftest import EMB, GEN

SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_each_model_and_the_service_report_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in (GEN, EMB, "irouter.v1.InferenceService", "irouter.v1.RetrievalService", ""):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == SERVING, service


async def test_watch_streams_the_current_status(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    call = health.Watch(health_pb2.HealthCheckRequest(service=GEN))
    async for response in call:
        assert response.status == SERVING
        break
    call.cancel()


async def test_unknown_model_health_is_not_found(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    try:
        await health.Check(health_pb2.HealthCheckRequest(service="nope"))
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("expected NOT_FOUND")


async def test_reflection_lists_and_describes_the_api(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(**kwargs: str) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kwargs)]))
        async for response in call:
            return response
        raise AssertionError("no reflection response")

    listed = await ask(list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "irouter.v1.InferenceService",
        "irouter.v1.RetrievalService",
        "grpc.health.v1.Health",
    } <= names
    described = await ask(file_containing_symbol="irouter.v1.InferenceService")
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"Generate", "Complete", "Embed", "ListModels"} <= methods


async def test_retrieval_is_served_by_the_router_itself(channel: grpc.aio.Channel) -> None:
    from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
    from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc

    stub = rpb_grpc.RetrievalServiceStub(channel)
    await stub.CreateCollection(
        rpb.CreateCollectionRequest(config=rpb.CollectionConfig(name="facts", embedding_model=EMB))
    )
    docs = {
        "fr": "Paris is the capital of France.",
        "jp": "Tokyo is the capital of Japan.",
        "py": "Python lists are mutable sequences.",
    }
    await stub.Upsert(
        rpb.UpsertRequest(
            collection="facts",
            documents=[rpb.Document(id=k, text=v) for k, v in docs.items()],
        )
    )
    found = await stub.Search(
        rpb.SearchRequest(collection="facts", text="Which city is France's capital?", top_k=2)
    )
    assert found.hits[0].id == "fr" and found.hits[0].text == docs["fr"]

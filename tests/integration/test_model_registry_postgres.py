"""ModelService on a real PostgreSQL (tests/postgres_server.py): the registry's behaviour as on
SQLite, two routers sharing one database, and a database that goes away: changes are refused
with UNAVAILABLE naming it while the data plane serves on, and succeed again once it is back.
A router whose database cannot be reached does not start."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from loadtest.processes import free_port
from router.errors import Unavailable
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as inference_grpc
from router.proto.irouter.v1 import model_service_pb2 as pb
from router.proto.irouter.v1 import model_service_pb2_grpc as pb_grpc
from router.registry import audit
from router.registry.config import RegistryConfig
from router.server import RouterServer
from tests.integration.conftest import EMB, make_config, running
from tests.integration.registry_calls import (
    AZURE,
    EMBEDDER,
    TIMEOUT,
    get,
    listed,
    minilm,
    register,
    remote_version,
    status_of,
    update,
)
from tests.postgres_server import PostgresServer
from tests.registry_revisions import AT_0005, upgraded_from_0005


@pytest.fixture(scope="module")
def registry_url(postgres: PostgresServer) -> str:
    return postgres.create_database("registry")


@contextlib.asynccontextmanager
async def router_on(
    model_cache: Path, data_dir: Path, url: str
) -> AsyncIterator[tuple[RouterServer, grpc.aio.Channel]]:
    config = make_config(
        model_cache, data_dir, EMBEDDER, retrieval=False, registry=RegistryConfig(url=url)
    )
    async with (
        running(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, channel


@pytest.fixture(scope="module")
async def served(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory, registry_url: str
) -> AsyncIterator[tuple[RouterServer, grpc.aio.Channel]]:
    async with router_on(model_cache, tmp_path_factory.mktemp("router"), registry_url) as pair:
        yield pair


@pytest.fixture(scope="module")
def stub(served: tuple[RouterServer, grpc.aio.Channel]) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(served[1])


async def test_register_list_update_and_delete(stub: pb_grpc.ModelServiceStub) -> None:
    stored = await register(
        stub, minilm("pg-minilm", tags=["pg"], input_price_per_1k="0.0005", description="one")
    )
    assert (stored.generation, stored.context_length, stored.created_by) == (1, 512, "anonymous")
    assert stored.input_price_per_1k == "0.0005"
    assert len(stored.artifact_sha256) == 64
    assert await get(stub, "pg-minilm", "1") == stored
    code, message = await status_of(register(stub, minilm("pg-minilm")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "'pg-minilm'" in message
    code, message = await status_of(register(stub, minilm("pg-minilm", "2", currency="usd")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "currency" in message

    await register(stub, minilm("pg-minilm", "2", tags=["pg"]))
    await register(stub, minilm("pg-minilm", "3"))
    assert await listed(stub, name="pg-minilm", page_size=1) == [
        ("pg-minilm", "1"),
        ("pg-minilm", "2"),
        ("pg-minilm", "3"),
    ]
    assert [k for k in await listed(stub, tag="pg", page_size=1) if k[0] == "pg-minilm"] == [
        ("pg-minilm", "1"),
        ("pg-minilm", "2"),
    ]

    updated = await update(
        stub,
        minilm("pg-minilm", description="two", tags=["x"]),
        "description",
        expected_generation=1,
    )
    assert (updated.description, list(updated.tags), updated.generation) == ("two", ["pg"], 2)
    code, message = await status_of(
        update(stub, minilm("pg-minilm", description="late"), "description", expected_generation=1)
    )
    assert code == grpc.StatusCode.ABORTED
    assert "generation 2" in message

    deprecated = await stub.DeprecateModelVersion(
        pb.DeprecateModelVersionRequest(name="pg-minilm", version="2", reason="old"),
        timeout=TIMEOUT,
    )
    assert deprecated.model_version.state == pb.MODEL_VERSION_STATE_DEPRECATED
    assert await listed(stub, name="pg-minilm") == [("pg-minilm", "1"), ("pg-minilm", "3")]

    await stub.DeleteModelVersion(
        pb.DeleteModelVersionRequest(name="pg-minilm", version="3"), timeout=TIMEOUT
    )
    code, message = await status_of(get(stub, "pg-minilm", "3"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'pg-minilm'" in message
    assert await listed(stub, name="pg-minilm", include_deprecated=True) == [
        ("pg-minilm", "1"),
        ("pg-minilm", "2"),
    ]


async def test_a_remote_servers_dialect_api_version_and_key_variable_are_stored(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    stored = await register(stub, remote_version("pg-azure"))
    assert stored.artifact.remote == AZURE and await get(stub, "pg-azure", "1") == stored


def test_an_upgrade_from_0005_keeps_its_versions_as_openai_servers_without_a_key(
    postgres: PostgresServer,
) -> None:
    assert upgraded_from_0005(postgres.create_database("from0005")) == AT_0005


async def test_concurrent_updates_at_one_generation_one_wins(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    await register(stub, minilm("pg-race"))
    results = await asyncio.gather(
        update(stub, minilm("pg-race", description="left"), "description", expected_generation=1),
        update(stub, minilm("pg-race", description="right"), "description", expected_generation=1),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.ModelVersion)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert lost[0].code() == grpc.StatusCode.ABORTED
    assert (await get(stub, "pg-race", "1")).description == won[0].description


async def test_changes_are_audited(
    served: tuple[RouterServer, grpc.aio.Channel], stub: pb_grpc.ModelServiceStub
) -> None:
    await register(stub, minilm("pg-audited", description="one"))
    await update(stub, minilm("pg-audited", description="two"), "description")
    await stub.DeleteModelVersion(
        pb.DeleteModelVersionRequest(name="pg-audited", version="1"), timeout=TIMEOUT
    )
    engine = served[0].registry
    assert engine is not None
    events = await asyncio.to_thread(audit.events, engine, target="pg-audited/1")
    assert [(e.action, e.actor) for e in events] == [
        ("model_version.register", "anonymous"),
        ("model_version.update", "anonymous"),
        ("model_version.delete", "anonymous"),
    ]
    assert (events[1].before["description"], events[1].after["description"]) == ("one", "two")
    assert events[2].after == {}


async def test_two_routers_on_one_database_see_each_others_versions(
    model_cache: Path, tmp_path: Path, registry_url: str, stub: pb_grpc.ModelServiceStub
) -> None:
    async with router_on(model_cache, tmp_path, registry_url) as (_, channel):
        other = pb_grpc.ModelServiceStub(channel)
        mine = await register(stub, minilm("pg-shared", "1"))
        assert await get(other, "pg-shared", "1") == mine
        theirs = await register(other, minilm("pg-shared", "2"))
        assert await get(stub, "pg-shared", "2") == theirs
        code, _ = await status_of(register(other, minilm("pg-shared", "1")))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        await update(other, minilm("pg-shared", description="by the other"), "description")
        assert (await get(stub, "pg-shared", "1")).generation == 2
        assert await listed(stub, name="pg-shared") == await listed(other, name="pg-shared")


async def assert_data_plane_answers(channel: grpc.aio.Channel) -> None:
    inference = inference_grpc.InferenceServiceStub(channel)
    models = await inference.ListModels(inference_pb.ListModelsRequest(), timeout=TIMEOUT)
    assert [m.name for m in models.models] == [EMB]


async def test_a_stopped_database_refuses_changes_by_name_while_inference_answers(
    postgres: PostgresServer,
    served: tuple[RouterServer, grpc.aio.Channel],
    stub: pb_grpc.ModelServiceStub,
) -> None:
    await register(stub, minilm("pg-outage", "1"))
    postgres.stop()
    try:
        code, message = await status_of(register(stub, minilm("pg-outage", "2")))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "registry database" in message
        code, message = await status_of(get(stub, "pg-outage", "1"))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "registry database" in message
        await assert_data_plane_answers(served[1])
    finally:
        postgres.restart()
    stored = await register(stub, minilm("pg-outage", "2"))
    assert stored.generation == 1
    assert await listed(stub, name="pg-outage") == [("pg-outage", "1"), ("pg-outage", "2")]


async def test_a_hung_database_refuses_changes_by_name_while_inference_answers(
    postgres: PostgresServer,
    served: tuple[RouterServer, grpc.aio.Channel],
    stub: pb_grpc.ModelServiceStub,
) -> None:
    await register(stub, minilm("pg-hang", "1"))  # leaves a pooled connection to the database
    postgres.pause()
    try:
        # A new connection gives up after the engine's 5 s connect_timeout; the call must not
        # wait for the database to come back.
        code, message = await status_of(register(stub, minilm("pg-hang", "2"), timeout=20))
        assert code == grpc.StatusCode.UNAVAILABLE, message
        assert "registry database" in message
        await assert_data_plane_answers(served[1])
    finally:
        postgres.resume()
    # Whether the refused "2" lands once the database wakes depends on how the wait was cut
    # short; "3", registered after, must.
    await register(stub, minilm("pg-hang", "3"))
    assert {("pg-hang", "1"), ("pg-hang", "3")} <= set(await listed(stub, name="pg-hang"))


async def test_a_router_whose_database_cannot_be_reached_does_not_start(
    model_cache: Path, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://postgres@127.0.0.1:{port}/registry"
    config = make_config(
        model_cache, tmp_path, EMBEDDER, retrieval=False, registry=RegistryConfig(url=url)
    )
    server = RouterServer(config)
    try:
        with pytest.raises(Unavailable) as info:
            await server.start()
    finally:
        await server.stop(0)
    message = str(info.value)
    assert "registry database" in message
    assert f"127.0.0.1:{port}/registry" in message

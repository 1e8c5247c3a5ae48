"""API keys in the registry's PostgreSQL database (tests/postgres_server.py): created with
`irouter keys` against the cluster's database and accepted by a router sharing it, revoked there
and refused by the router within its poll, and, with the database gone, keys already verified
still accepted while new ones get UNAVAILABLE (not "unknown key")."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from router.guard.config import AuthSection, GuardConfig
from router.keys_cli import register_cli, run_cli
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.registry import audit
from router.registry.config import RegistryConfig
from router.registry.keys import open_key_store
from router.registry.postgres_keys import POLL_S
from router.server import RouterServer
from tests.integration.conftest import EMB, make_config, running
from tests.integration.registry_calls import EMBEDDER, TIMEOUT
from tests.postgres_server import PostgresServer


@pytest.fixture(scope="module")
def registry_url(postgres: PostgresServer) -> str:
    return postgres.create_database("keys")


@pytest.fixture(scope="module")
async def router(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory, registry_url: str
) -> AsyncIterator[RouterServer]:
    # No guard.auth.registry: the keys are the registry database's.
    guard = GuardConfig(auth=AuthSection(enabled=True))
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("router"),
        EMBEDDER,
        retrieval=False,
        registry=RegistryConfig(url=registry_url),
        guard=guard,
    )
    async with running(config) as server:
        yield server


def keys_cli(argv: list[str], capsys: pytest.CaptureFixture[str], db: str) -> dict[str, str]:
    """`irouter keys ... --db URL`, as an admin runs it on another host; its printed fields."""
    parser = argparse.ArgumentParser(prog="irouter")
    register_cli(parser.add_subparsers(dest="command", required=True))
    assert run_cli(parser.parse_args(["keys", "--db", db, *argv])) == 0
    out = capsys.readouterr().out
    return dict(line.split(": ", 1) for line in out.strip().splitlines() if ": " in line)


async def embed(router: RouterServer, key: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        try:
            await stub.Embed(
                pb.EmbedRequest(model=EMB, texts=["hello"]),
                metadata=(("x-api-key", key),),
                timeout=TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_keys_made_on_the_cluster_database_work_and_revoke_everywhere(
    router: RouterServer, registry_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    made = keys_cli(
        ["create", "--tenant", "acme", "--scopes", "inference:embed"], capsys, registry_url
    )
    key_id, key = made["key id"].strip(), made["api key"].strip()
    assert await embed(router, key) == grpc.StatusCode.OK
    assert await embed(router, key) == grpc.StatusCode.OK  # from the router's cache now
    keys_cli(["revoke", key_id], capsys, registry_url)
    deadline = time.monotonic() + 10 * POLL_S
    while await embed(router, key) == grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the revocation did not reach the router"
        await asyncio.sleep(POLL_S / 5)
    assert await embed(router, key) == grpc.StatusCode.UNAUTHENTICATED
    store = open_key_store(registry_url)
    try:
        listed = {r.key_id: r for r in store.list()}
        assert listed[key_id].revoked and listed[key_id].tenant == "acme"
    finally:
        store.close()
    engine = sa.create_engine(registry_url)  # the row is in the cluster's database itself
    try:
        with engine.connect() as connection:
            query = sa.text("SELECT tenant, revoked_at IS NOT NULL FROM api_keys WHERE key_id = :k")
            assert connection.execute(query, {"k": key_id}).one() == ("acme", True)
        actions = [e.action for e in audit.events(engine, target=f"api_key/{key_id}")]
        assert actions == ["api_key.create", "api_key.revoke"]
    finally:
        engine.dispose()


async def test_a_database_gone_keeps_verified_keys_and_refuses_unknown_ones_as_unavailable(
    router: RouterServer,
    postgres: PostgresServer,
    registry_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    scopes = ["--scopes", "inference:embed"]
    known = keys_cli(["create", "--tenant", "acme", *scopes], capsys, registry_url)["api key"]
    fresh = keys_cli(["create", "--tenant", "acme", *scopes], capsys, registry_url)["api key"]
    assert await embed(router, known.strip()) == grpc.StatusCode.OK
    postgres.stop()
    try:
        # Once the revocation poller has failed too, known keys must still be accepted.
        deadline = time.monotonic() + 10 * POLL_S
        while "cannot read API key revocations" not in caplog.text:
            assert time.monotonic() < deadline, "the poller never saw the database gone"
            await asyncio.sleep(POLL_S / 5)
        assert await embed(router, known.strip()) == grpc.StatusCode.OK
        assert await embed(router, fresh.strip()) == grpc.StatusCode.UNAVAILABLE
    finally:
        postgres.restart()
    assert await embed(router, fresh.strip()) == grpc.StatusCode.OK

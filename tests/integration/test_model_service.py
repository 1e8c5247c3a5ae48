"""ModelService (the registry of model versions) on a real in-process router: registration
with its artifact checked, the refusals that name their field, listing and paging, updates
with a field mask and generations, deprecation, deletion, the audit log, scopes with the guard
on, the REST routes, the `irouter models` CLI, and a registry that outlives a restart.

One router (the embedder only: registering needs no loaded model) serves most tests; each test
registers versions under names of its own, so none depends on another or on their order."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from router import cli
from router.guard.config import AuthSection, GuardConfig
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import model_service_pb2 as pb
from router.proto.irouter.v1 import model_service_pb2_grpc as pb_grpc
from router.registry import audit
from router.registry.keys import KeyStore
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN, make_config, running
from tests.integration.registry_calls import (
    AZURE,
    EMBED,
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
from tests.integration.rest_proxy import serve_proxy

GENERATE = inference_pb.MODEL_KIND_GENERATE
ACTIVE = pb.MODEL_VERSION_STATE_ACTIVE
DEPRECATED = pb.MODEL_VERSION_STATE_DEPRECATED


@pytest.fixture(scope="module")
async def server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    config = make_config(
        model_cache, tmp_path_factory.mktemp("registry"), EMBEDDER, retrieval=False
    )
    async with running(config) as router:
        yield router


@pytest.fixture(scope="module")
async def stub(server: RouterServer) -> AsyncIterator[pb_grpc.ModelServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ModelServiceStub(channel)


# --- registration ---------------------------------------------------------------------------


async def test_register_the_packaged_models_records_their_artifacts(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    smol = pb.ModelVersion(
        name="smollm2",
        version="1",
        kind=GENERATE,
        artifact=pb.Artifact(package=GEN),
        description="SmolLM2 135M instruct, Q4_1",
        input_price_per_1k="0.0005",
        output_price_per_1k="0.0015",
        tags=["chat", "int4"],
    )
    stored = await register(stub, smol)
    assert re.fullmatch(r"[0-9a-f]{64}", stored.artifact_sha256), stored.artifact_sha256
    assert stored.artifact_format == "gguf"
    assert stored.artifact_size_bytes > 0
    assert stored.context_length == 8192  # the GGUF's own limit: 0 was sent
    assert stored.generation == 1
    assert stored.state == ACTIVE
    assert stored.create_time.seconds > 0
    assert stored.update_time == stored.create_time
    assert stored.created_by == "anonymous"
    assert (stored.input_price_per_1k, stored.output_price_per_1k) == ("0.0005", "0.0015")
    assert stored.currency == "USD"
    assert list(stored.tags) == ["chat", "int4"]
    assert stored.description == "SmolLM2 135M instruct, Q4_1"
    assert stored.artifact.package == GEN
    assert await get(stub, "smollm2", "1") == stored

    embedder = await register(stub, minilm("minilm"))
    assert embedder.kind == EMBED
    assert embedder.artifact_format == "safetensors"
    assert embedder.context_length == 512
    assert re.fullmatch(r"[0-9a-f]{64}", embedder.artifact_sha256)
    assert await get(stub, "minilm", "1") == embedder


async def test_register_a_prepared_folder_and_a_remote_server(
    stub: pb_grpc.ModelServiceStub, model_cache: Path
) -> None:
    folder = await register(
        stub, minilm("minilm-onnx", artifact=pb.Artifact(path=str(model_cache / EMB)))
    )
    assert folder.artifact_format == "onnx"
    assert folder.artifact.path == str(model_cache / EMB)
    assert folder.context_length > 0
    assert re.fullmatch(r"[0-9a-f]{64}", folder.artifact_sha256)

    remote = pb.RemoteArtifact(backend="openai_http", url="http://127.0.0.1:9/v1", model="m")
    stored = await register(
        stub,
        pb.ModelVersion(
            name="remote-chat",
            version="1",
            kind=GENERATE,
            artifact=pb.Artifact(remote=remote),
            context_length=4096,
        ),
    )
    assert stored.artifact_format == "remote"
    assert (stored.artifact_sha256, stored.artifact_size_bytes) == ("", 0)
    assert stored.context_length == 4096
    assert stored.artifact.remote == remote


async def test_a_remote_server_is_registered_with_its_dialect_api_version_and_key_variable(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    stored = await register(stub, remote_version("remote-azure"))
    assert stored.artifact.remote == AZURE
    assert await get(stub, "remote-azure", "1") == stored


async def test_a_duplicate_name_and_version_is_refused_and_changes_nothing(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    first = await register(stub, minilm("dup", description="the first"))
    code, message = await status_of(
        register(stub, minilm("dup", description="the second", tags=["x"]))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "'dup'" in message and "'1'" in message
    assert await get(stub, "dup", "1") == first
    assert await listed(stub, name="dup") == [("dup", "1")]


BAD_REGISTRATIONS = {
    "bad name": (minilm("Bad Name", "1"), "model_version.name"),
    "bad version": (minilm("refused", "v 1"), "model_version.version"),
    "no kind": (minilm("refused", "kind", kind=0), "model_version.kind"),
    "no artifact": (pb.ModelVersion(name="refused", version="art", kind=EMBED), "artifact"),
    "kind mismatch": (minilm("refused", "mismatch", kind=GENERATE), "kind"),
    "relative path": (
        minilm("refused", "rel", artifact=pb.Artifact(path="models/x.gguf")),
        "artifact.path",
    ),
    "unknown package": (
        minilm("refused", "pkg", artifact=pb.Artifact(package="nope")),
        "artifact.package",
    ),
    "context above own": (
        minilm("refused", "ctx", context_length=513),
        "model_version.context_length",
    ),
    "price not a number": (
        minilm("refused", "p1", input_price_per_1k="abc"),
        "model_version.input_price_per_1k",
    ),
    "negative price": (
        minilm("refused", "p2", output_price_per_1k="-1"),
        "model_version.output_price_per_1k",
    ),
    "NaN price": (
        minilm("refused", "p3", input_price_per_1k="NaN"),
        "model_version.input_price_per_1k",
    ),
    "too precise price": (
        minilm("refused", "p4", input_price_per_1k="0.0000000000001"),
        "model_version.input_price_per_1k",
    ),
    "lower-case currency": (minilm("refused", "cur", currency="usd"), "currency"),
    "schema not JSON": (
        minilm("refused", "schema", input_schema="{not json"),
        "model_version.input_schema",
    ),
    "remote without context length": (
        pb.ModelVersion(
            name="refused",
            version="remote",
            kind=GENERATE,
            artifact=pb.Artifact(
                remote=pb.RemoteArtifact(backend="openai_http", url="http://127.0.0.1:9")
            ),
        ),
        "model_version.context_length",
    ),
    "unknown dialect": (
        remote_version(
            "refused", "dialect", pb.RemoteArtifact(backend="openai_http", dialect="tgi")
        ),
        "artifact.remote.dialect",
    ),
    "azure without api_version": (
        remote_version(
            "refused", "azure", pb.RemoteArtifact(backend="openai_http", dialect="azure")
        ),
        "artifact.remote.api_version",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REGISTRATIONS))
async def test_bad_registrations_name_their_field(
    stub: pb_grpc.ModelServiceStub, case: str
) -> None:
    version, field = BAD_REGISTRATIONS[case]
    code, message = await status_of(register(stub, version))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert field in message


async def test_refused_registrations_leave_nothing_behind(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    missing = minilm("refused", "missing", artifact=pb.Artifact(path="/no/such/model.gguf"))
    code, message = await status_of(register(stub, missing))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "artifact.path" in message and "/no/such/model.gguf" in message
    for version, _ in BAD_REGISTRATIONS.values():
        await status_of(register(stub, version))
    assert await listed(stub, name="refused", include_deprecated=True) == []
    everything = await listed(stub, include_deprecated=True, page_size=1000)
    assert not [key for key in everything if key[0] in ("refused", "Bad Name")]


# --- listing --------------------------------------------------------------------------------


async def test_list_filters_by_name_kind_tag_and_state(stub: pb_grpc.ModelServiceStub) -> None:
    await register(stub, minilm("list-a", "1", tags=["blue"]))
    await register(stub, minilm("list-a", "2", tags=["blue", "red"]))
    await register(stub, minilm("list-b", "1", tags=["red"]))
    remote = pb.Artifact(remote=pb.RemoteArtifact(backend="openai_http", url="http://127.0.0.1:9"))
    await register(
        stub,
        pb.ModelVersion(
            name="list-c", version="1", kind=GENERATE, artifact=remote, context_length=2048
        ),
    )
    await stub.DeprecateModelVersion(
        pb.DeprecateModelVersionRequest(name="list-a", version="1", reason="old"), timeout=TIMEOUT
    )

    assert await listed(stub, name="list-a") == [("list-a", "2")]
    assert await listed(stub, name="list-a", include_deprecated=True) == [
        ("list-a", "1"),
        ("list-a", "2"),
    ]
    mine = {("list-a", "1"), ("list-a", "2"), ("list-b", "1"), ("list-c", "1")}
    red = [key for key in await listed(stub, tag="red") if key in mine]
    assert red == [("list-a", "2"), ("list-b", "1")]
    blue = [key for key in await listed(stub, tag="blue", include_deprecated=True) if key in mine]
    assert blue == [("list-a", "1"), ("list-a", "2")]
    generate = await listed(stub, kind=GENERATE)
    assert ("list-c", "1") in generate
    assert not {("list-a", "2"), ("list-b", "1")} & set(generate)
    page = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(kind=EMBED, page_size=1000), timeout=TIMEOUT
    )
    assert {v.kind for v in page.model_versions} == {EMBED}
    assert ("list-b", "1") in {(v.name, v.version) for v in page.model_versions}


async def test_pages_of_one_walk_every_version_once(stub: pb_grpc.ModelServiceStub) -> None:
    for version in ("1", "2", "3"):
        await register(stub, minilm("paged", version))
    whole = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(include_deprecated=True, page_size=1000), timeout=TIMEOUT
    )
    assert whole.next_page_token == ""
    expected = [(v.name, v.version) for v in whole.model_versions]
    walked = await listed(stub, include_deprecated=True, page_size=1)
    assert walked == expected
    assert len(set(walked)) == len(walked)
    assert await listed(stub, name="paged", page_size=1) == [
        ("paged", "1"),
        ("paged", "2"),
        ("paged", "3"),
    ]
    # By model name, then registration order.
    assert [name for name, _ in expected] == sorted(name for name, _ in expected)


@pytest.mark.parametrize("token", ["garbage!", "bm90IGpzb24", "WzEsIDJd", "eyJhIjogMX0"])
async def test_a_page_token_the_server_never_gave_is_refused(
    stub: pb_grpc.ModelServiceStub, token: str
) -> None:
    code, message = await status_of(
        stub.ListModelVersions(pb.ListModelVersionsRequest(page_token=token), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in message


async def test_a_well_formed_page_token_with_an_out_of_range_id_is_refused(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    """A token is client input: ["name", 10**30] decodes, but no row id is that large (SQLite
    raises OverflowError on it, PostgreSQL's int4 column DataError)."""
    token = base64.urlsafe_b64encode(json.dumps(["a", 10**30]).encode()).decode()
    code, message = await status_of(
        stub.ListModelVersions(pb.ListModelVersionsRequest(page_token=token), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert "page_token" in message


async def test_list_refuses_a_bad_name_and_an_oversized_page(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    code, message = await status_of(
        stub.ListModelVersions(pb.ListModelVersionsRequest(name="Bad Name"), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in message and "'Bad Name'" in message
    code, message = await status_of(
        stub.ListModelVersions(pb.ListModelVersionsRequest(page_size=1001), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size=1001" in message


# --- updates, deprecation, deletion ---------------------------------------------------------


async def test_update_changes_only_the_masked_fields_and_bumps_the_generation(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    before = await register(
        stub,
        minilm(
            "upd",
            description="old",
            input_price_per_1k="0.1",
            output_price_per_1k="0.2",
            tags=["a"],
            input_schema='{"type": "object"}',
        ),
    )
    change = minilm(
        "upd",
        description="new",
        input_price_per_1k="0.0003",
        output_price_per_1k="0.2",
        tags=["b", "c"],
        input_schema="not even JSON",  # not in the mask: ignored
        currency="EUR",  # not in the mask: ignored
        context_length=1,  # not in the mask: ignored
    )
    after = await update(stub, change, "description", "input_price_per_1k", "tags")
    assert after.generation == before.generation + 1 == 2
    assert after.description == "new"
    assert after.input_price_per_1k == "0.0003"
    assert list(after.tags) == ["b", "c"]
    assert after.update_time.ToNanoseconds() > before.update_time.ToNanoseconds()
    unchanged = (
        "output_price_per_1k",
        "input_schema",
        "currency",
        "context_length",
        "artifact",
        "artifact_sha256",
        "create_time",
        "created_by",
        "kind",
        "state",
    )
    for field in unchanged:
        assert getattr(after, field) == getattr(before, field), field
    assert await get(stub, "upd", "1") == after

    # An update whose value is wrong names the field and changes nothing.
    code, message = await status_of(update(stub, minilm("upd", currency="usd"), "currency"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "currency" in message
    code, message = await status_of(
        update(stub, minilm("upd", output_price_per_1k="-1"), "output_price_per_1k")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_price_per_1k" in message
    assert (await get(stub, "upd", "1")).generation == 2


@pytest.mark.parametrize("path", ["artifact", "context_length", "kind", "name"])
async def test_update_refuses_a_path_that_cannot_change(
    stub: pb_grpc.ModelServiceStub, path: str
) -> None:
    name = f"frozen-{path.replace('_', '-')}"
    before = await register(stub, minilm(name))
    code, message = await status_of(update(stub, minilm(name, context_length=100), path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in message and repr(path) in message
    assert await get(stub, name, "1") == before


async def test_update_refuses_an_empty_mask(stub: pb_grpc.ModelServiceStub) -> None:
    before = await register(stub, minilm("empty-mask"))
    code, message = await status_of(update(stub, minilm("empty-mask", description="x")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in message
    assert await get(stub, "empty-mask", "1") == before


async def test_a_stale_expected_generation_is_aborted_naming_the_current_one(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    await register(stub, minilm("gen"))
    await update(stub, minilm("gen", description="two"), "description", expected_generation=1)
    code, message = await status_of(
        update(stub, minilm("gen", description="late"), "description", expected_generation=1)
    )
    assert code == grpc.StatusCode.ABORTED
    assert "generation 2" in message
    current = await get(stub, "gen", "1")
    assert (current.description, current.generation) == ("two", 2)
    third = await update(
        stub, minilm("gen", description="three"), "description", expected_generation=2
    )
    assert third.generation == 3


async def test_updates_of_missing_versions_are_not_found(stub: pb_grpc.ModelServiceStub) -> None:
    code, message = await status_of(update(stub, minilm("no-such", "9"), "description"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'no-such'" in message and "'9'" in message
    code, message = await status_of(
        stub.DeprecateModelVersion(
            pb.DeprecateModelVersionRequest(name="no-such", version="9"), timeout=TIMEOUT
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, message = await status_of(get(stub, "no-such", "9"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'no-such'" in message


async def test_concurrent_updates_at_one_generation_one_wins(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    await register(stub, minilm("race"))
    results = await asyncio.gather(
        update(stub, minilm("race", description="left"), "description", expected_generation=1),
        update(stub, minilm("race", description="right"), "description", expected_generation=1),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.ModelVersion)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert lost[0].code() == grpc.StatusCode.ABORTED
    assert "generation 2" in (lost[0].details() or "")
    current = await get(stub, "race", "1")
    assert current.generation == 2
    assert current.description == won[0].description


async def test_deprecate_keeps_the_version_but_hides_it_from_default_lists(
    stub: pb_grpc.ModelServiceStub,
) -> None:
    await register(stub, minilm("dep"))
    done = await stub.DeprecateModelVersion(
        pb.DeprecateModelVersionRequest(name="dep", version="1", reason="superseded by 2"),
        timeout=TIMEOUT,
    )
    version = done.model_version
    assert version.state == DEPRECATED
    assert version.deprecation_reason == "superseded by 2"
    assert version.generation == 2
    assert await get(stub, "dep", "1") == version
    assert await listed(stub, name="dep") == []
    assert await listed(stub, name="dep", include_deprecated=True) == [("dep", "1")]


async def test_delete_removes_the_version(stub: pb_grpc.ModelServiceStub) -> None:
    await register(stub, minilm("del", "1"))
    await register(stub, minilm("del", "2"))
    request = pb.DeleteModelVersionRequest(name="del", version="1")
    assert await stub.DeleteModelVersion(request, timeout=TIMEOUT) == (
        pb.DeleteModelVersionResponse()
    )
    code, message = await status_of(get(stub, "del", "1"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'del'" in message and "'1'" in message
    code, message = await status_of(stub.DeleteModelVersion(request, timeout=TIMEOUT))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'del'" in message
    assert await listed(stub, name="del", include_deprecated=True) == [("del", "2")]
    # The name and version are free again.
    again = await register(stub, minilm("del", "1"))
    assert again.generation == 1


# --- audit ----------------------------------------------------------------------------------


async def test_every_change_is_an_audit_event_with_before_and_after(
    server: RouterServer, stub: pb_grpc.ModelServiceStub
) -> None:
    assert server.registry is not None
    stored = await register(stub, minilm("audited", description="one", tags=["a"]))
    await update(stub, minilm("audited", description="two"), "description")
    await stub.DeprecateModelVersion(
        pb.DeprecateModelVersionRequest(name="audited", version="1", reason="why not"),
        timeout=TIMEOUT,
    )
    await stub.DeleteModelVersion(
        pb.DeleteModelVersionRequest(name="audited", version="1"), timeout=TIMEOUT
    )
    events = await asyncio.to_thread(audit.events, server.registry, target="audited/1")
    assert [e.action for e in events] == [
        "model_version.register",
        "model_version.update",
        "model_version.deprecate",
        "model_version.delete",
    ]
    assert {e.actor for e in events} == {"anonymous"}
    assert {e.target for e in events} == {"audited/1"}
    registered, updated, deprecated, deleted = events
    assert registered.before == {}
    assert registered.after["name"] == "audited"
    assert registered.after["description"] == "one"
    assert registered.after["artifact_sha256"] == stored.artifact_sha256
    assert registered.after["generation"] == 1
    assert updated.before["description"] == "one"
    assert updated.after["description"] == "two"
    assert (updated.before["generation"], updated.after["generation"]) == (1, 2)
    assert "tags" not in updated.after  # only what changed
    assert (deprecated.before["state"], deprecated.after["state"]) == ("active", "deprecated")
    assert deprecated.after["deprecation_reason"] == "why not"
    assert deleted.before["generation"] == 3
    assert deleted.before["description"] == "two"
    assert deleted.after == {}
    assert events == sorted(events, key=lambda e: e.id)
    assert all(e.at > 0 for e in events)


async def test_a_refused_change_leaves_no_audit_event(
    server: RouterServer, stub: pb_grpc.ModelServiceStub
) -> None:
    assert server.registry is not None
    await register(stub, minilm("quiet"))
    await status_of(register(stub, minilm("quiet")))
    await status_of(update(stub, minilm("quiet"), "description", expected_generation=7))
    events = await asyncio.to_thread(audit.events, server.registry, target="quiet/1")
    assert [e.action for e in events] == ["model_version.register"]


# --- the guard ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def guarded(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RouterServer, Path]]:
    tmp = tmp_path_factory.mktemp("guarded-registry")
    guard = GuardConfig(auth=AuthSection(enabled=True, registry=tmp / "keys.db"))
    config = make_config(model_cache, tmp, EMBEDDER, retrieval=False, guard=guard)
    async with running(config) as router:
        yield router, tmp / "keys.db"


def make_key(keys: Path, *scopes: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(key id, call metadata) of a new key of tenant 'acme' with `scopes`."""
    store = KeyStore(keys)
    try:
        key_id, key = store.create("acme", frozenset(scopes))
    finally:
        store.close()
    return key_id, (("x-api-key", key),)


async def test_scopes_guard_reads_and_changes(guarded: tuple[RouterServer, Path]) -> None:
    server, keys = guarded
    _, inference = make_key(keys, "inference:generate")
    _, reader = make_key(keys, "models:read")
    writer_id, writer = make_key(keys, "models:write")
    _, admin = make_key(keys, "admin")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        list_all = pb.ListModelVersionsRequest(include_deprecated=True)

        code, message = await status_of(register(stub, minilm("guarded"), inference))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "models:write" in message
        code, message = await status_of(
            stub.ListModelVersions(list_all, metadata=inference, timeout=TIMEOUT)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "models:read" in message
        code, _ = await status_of(stub.ListModelVersions(list_all, timeout=TIMEOUT))
        assert code == grpc.StatusCode.UNAUTHENTICATED

        code, message = await status_of(register(stub, minilm("guarded"), reader))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "models:write" in message
        code, message = await status_of(
            stub.DeleteModelVersion(
                pb.DeleteModelVersionRequest(name="guarded", version="1"),
                metadata=reader,
                timeout=TIMEOUT,
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "models:write" in message
        empty = await stub.ListModelVersions(list_all, metadata=reader, timeout=TIMEOUT)
        assert list(empty.model_versions) == []

        stored = await register(stub, minilm("guarded"), writer)
        assert stored.created_by == f"api-key:{writer_id}@acme"
        page = await stub.ListModelVersions(list_all, metadata=reader, timeout=TIMEOUT)
        assert [(v.name, v.created_by) for v in page.model_versions] == [
            ("guarded", stored.created_by)
        ]

        # admin grants every scope.
        await register(stub, minilm("guarded", "2"), admin)
        page = await stub.ListModelVersions(list_all, metadata=admin, timeout=TIMEOUT)
        assert [v.version for v in page.model_versions] == ["1", "2"]

    assert server.registry is not None
    events = await asyncio.to_thread(audit.events, server.registry, target="guarded/1")
    assert [(e.action, e.actor) for e in events] == [
        ("model_version.register", f"api-key:{writer_id}@acme")
    ]


# --- REST -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def http(server: RouterServer) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve_proxy(f"127.0.0.1:{server.port}") as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as client,
    ):
        yield client


async def test_rest_routes_register_read_change_and_refuse(
    http: httpx.AsyncClient, stub: pb_grpc.ModelServiceStub
) -> None:
    body = {
        "version": "1",
        "kind": "MODEL_KIND_EMBED",
        "artifact": {"package": EMB},
        "tags": ["rest"],
        "inputPricePer1k": "0.0001",
    }
    r = await http.post("/v1beta/registry/models/rest-minilm/versions", json=body)
    assert r.status_code == 200, r.text
    created = r.json()["modelVersion"]
    assert created["name"] == "rest-minilm"
    assert created["state"] == "MODEL_VERSION_STATE_ACTIVE"
    assert created["generation"] == "1"  # uint64: a string in canonical JSON
    assert created["inputPricePer1k"] == "0.0001"
    assert created["contextLength"] == 512
    assert created["createdBy"] == "anonymous"
    grpc_view = await get(stub, "rest-minilm", "1")
    assert created["artifactSha256"] == grpc_view.artifact_sha256

    r = await http.get("/v1beta/registry/models/rest-minilm/versions/1")
    assert r.status_code == 200, r.text
    assert r.json()["modelVersion"] == created

    r = await http.get("/v1beta/registry/model-versions", params={"tag": "rest"})
    assert r.status_code == 200, r.text
    assert [(v["name"], v["version"]) for v in r.json()["modelVersions"]] == [("rest-minilm", "1")]
    r = await http.get("/v1beta/registry/models/rest-minilm/versions")
    assert r.status_code == 200, r.text
    assert [v["version"] for v in r.json()["modelVersions"]] == ["1"]

    r = await http.post("/v1beta/registry/models/rest-minilm/versions", json=body)
    assert r.status_code == 409
    assert r.json()["code"] == grpc.StatusCode.ALREADY_EXISTS.value[0]

    r = await http.post(
        "/v1beta/registry/models/rest-minilm/versions/1:deprecate", json={"reason": "old"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["modelVersion"]["state"] == "MODEL_VERSION_STATE_DEPRECATED"
    assert r.json()["modelVersion"]["deprecationReason"] == "old"

    r = await http.delete("/v1beta/registry/models/rest-minilm/versions/1")
    assert r.status_code == 200, r.text
    assert r.json() == {}
    r = await http.get("/v1beta/registry/models/rest-minilm/versions/1")
    assert r.status_code == 404
    assert r.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "'rest-minilm'" in r.json()["message"]


async def test_rest_update_takes_its_field_mask_from_the_query(
    http: httpx.AsyncClient, stub: pb_grpc.ModelServiceStub
) -> None:
    """The PATCH binding's body is the version, so update_mask can only come from the query:
    as its JSON string (`updateMask=description,tags`, Google's REST convention)."""
    await register(stub, minilm("rest-upd", tags=["a"]))
    r = await http.patch(
        "/v1beta/registry/models/rest-upd/versions/1",
        params={"updateMask": "description,tags", "expectedGeneration": "1"},
        json={"description": "over REST", "tags": ["b"], "currency": "EUR"},
    )
    assert r.status_code == 200, r.text
    updated = r.json()["modelVersion"]
    assert (updated["description"], updated["tags"]) == ("over REST", ["b"])
    assert (updated["currency"], updated["generation"]) == ("USD", "2")
    r = await http.patch(
        "/v1beta/registry/models/rest-upd/versions/1",
        params={"updateMask": "description", "expectedGeneration": "1"},
        json={"description": "late"},
    )
    assert r.status_code == 409, r.text
    assert "generation 2" in r.json()["message"]


async def test_rest_refusals_carry_the_message(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1beta/registry/models/rest-bad/versions",
        json={"version": "1", "artifact": {"package": EMB}},
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "model_version.kind" in r.json()["message"]
    r = await http.post(
        "/v1beta/registry/models/rest-bad/versions",
        json={"version": "1", "kind": "MODEL_KIND_EMBED", "artifact": {"package": EMB},
              "inputPricePer1k": "-1"},
    )  # fmt: skip
    assert r.status_code == 400, r.text
    assert "model_version.input_price_per_1k" in r.json()["message"]
    r = await http.get("/v1beta/registry/models/rest-bad/versions/9")
    assert r.status_code == 404
    assert "'rest-bad'" in r.json()["message"]
    r = await http.get("/v1beta/registry/model-versions", params={"pageToken": "garbage!"})
    assert r.status_code == 400
    assert "page_token" in r.json()["message"]


# --- the CLI --------------------------------------------------------------------------------


async def irouter(*argv: str) -> int:
    """`irouter ARGV`, on a worker thread: its blocking gRPC client would stall the router,
    which runs on this test's loop."""
    return await asyncio.to_thread(cli.main, list(argv))


async def test_the_cli_drives_the_registry(
    server: RouterServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", f"127.0.0.1:{server.port}")
    name = "cli-minilm"

    register_args = ("models", "register", name, "1", "--kind", "embed", "--package", EMB)
    assert await irouter(*register_args, "--tags", "x,y", *target) == 0
    out, err = capsys.readouterr()
    assert f"checking the artifact of {name}/1" in err
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "VERSION", "KIND", "STATE"]
    assert row.split()[:5] == [name, "1", "embed", "active", "512"]
    assert f"package:{EMB}" in row and "x,y" in row

    assert await irouter(*register_args, *target) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "ALREADY_EXISTS" in err and repr(name) in err

    assert await irouter("models", "list", name, *target) == 0
    out, _ = capsys.readouterr()
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [[name, "1"]]

    assert await irouter("models", "show", name, "1", "--json", *target) == 0
    out, _ = capsys.readouterr()
    shown = json.loads(out)["model_version"]
    assert (shown["name"], shown["version"], shown["generation"]) == (name, "1", "1")
    assert shown["tags"] == ["x", "y"]
    assert shown["created_by"] == "anonymous"

    assert await irouter("models", "update", name, "1", "--description", "x", *target) == 0
    capsys.readouterr()
    assert (
        await irouter(
            "models", "update", name, "1", "--description", "y", "--generation", "1", *target
        )
        == 1
    )
    _, err = capsys.readouterr()
    assert "ABORTED" in err and "generation 2" in err
    assert await irouter("models", "update", name, "1", *target) == 2
    _, err = capsys.readouterr()
    assert "--description" in err

    assert await irouter("models", "deprecate", name, "1", "--reason", "old", *target) == 0
    out, _ = capsys.readouterr()
    assert "deprecated" in out
    assert await irouter("models", "list", name, *target) == 0
    assert capsys.readouterr().out.strip() == "(none)"
    assert await irouter("models", "list", name, "--all", "--json", *target) == 0
    listed_json = json.loads(capsys.readouterr().out)["model_versions"]
    assert [(v["description"], v["deprecation_reason"]) for v in listed_json] == [("x", "old")]

    assert await irouter("models", "delete", name, "1", *target) == 0
    assert capsys.readouterr().out.strip() == "done"
    assert await irouter("models", "show", name, "1", *target) == 1
    _, err = capsys.readouterr()
    assert "NOT_FOUND" in err and repr(name) in err


async def test_the_cli_registers_a_remote_servers_dialect_api_version_and_key_variable(
    server: RouterServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", f"127.0.0.1:{server.port}")
    register_args = ("models", "register", "cli-azure", "1", "--kind", "generate")
    server_args = (
        *("--remote-url", AZURE.url, "--remote-dialect", AZURE.dialect),
        *("--remote-api-version", AZURE.api_version, "--remote-api-key-env", AZURE.api_key_env),
    )
    assert await irouter(*register_args, *server_args, "--context-length", "8192", *target) == 0
    capsys.readouterr()
    assert await irouter("models", "show", "cli-azure", "1", "--json", *target) == 0
    shown = json.loads(capsys.readouterr().out)["model_version"]["artifact"]["remote"]
    assert shown == {
        "backend": "openai_http",
        "url": AZURE.url,
        "dialect": "azure",
        "api_version": "2024-10-21",
        "api_key_env": AZURE.api_key_env,
    }


# --- restart --------------------------------------------------------------------------------


async def test_the_registry_outlives_a_restart(model_cache: Path, tmp_path: Path) -> None:
    config = make_config(model_cache, tmp_path, EMBEDDER, retrieval=False)
    async with (
        running(config) as first,
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel,
    ):
        stored = await register(pb_grpc.ModelServiceStub(channel), minilm("kept", tags=["t"]))
    assert (tmp_path / "registry.db").exists()
    async with (
        running(config) as second,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel,
    ):
        stub = pb_grpc.ModelServiceStub(channel)
        page = await stub.ListModelVersions(pb.ListModelVersionsRequest(), timeout=TIMEOUT)
        assert list(page.model_versions) == [stored]
        assert second.registry is not None
        events = await asyncio.to_thread(audit.events, second.registry, target="kept/1")
        assert [e.action for e in events] == ["model_version.register"]

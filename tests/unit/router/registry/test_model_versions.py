"""Model versions' rules and storage on a real SQLite registry (PostgreSQL: the integration
tests). The artifact is a checked remote one, so nothing here hashes a model."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from router.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, Unavailable
from router.registry import audit
from router.registry.artifacts import Artifact, CheckedArtifact
from router.registry.config import RegistryConfig
from router.registry.database import engine_url, migrate, open_database
from router.registry.model_versions import (
    DEPRECATED,
    ModelVersion,
    parse_price,
    price_text,
    validate_draft,
)
from router.registry.version_store import ModelVersionStore
from tests.registry_revisions import AT_0005, upgraded_from_0005

REMOTE = CheckedArtifact(
    artifact=Artifact("remote", "http://127.0.0.1:9/v1", "openai_http", "m"),
    format="remote",
    kind="generate",
    sha256="",
    size_bytes=0,
    context_length=0,
)
LOCAL = CheckedArtifact(
    artifact=Artifact("package", "smollm2-135m-instruct"),
    format="gguf",
    kind="generate",
    sha256="ab" * 32,
    size_bytes=123,
    context_length=8192,
)


def draft(name: str = "m", version: str = "1", **fields: object) -> ModelVersion:
    base: dict[str, object] = {"kind": "generate", "artifact": LOCAL, "context_length": 0}
    return validate_draft(ModelVersion(name=name, version=version, **{**base, **fields}))  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> ModelVersionStore:
    clock = iter(float(t) for t in range(1_000, 100_000))
    return ModelVersionStore(
        open_database(f"sqlite:///{tmp_path / 'r.db'}"), clock=lambda: next(clock)
    )


def test_engine_url_maps_postgresql_to_psycopg_and_refuses_others() -> None:
    assert engine_url("postgresql://u@h:5/db").drivername == "postgresql+psycopg"
    assert engine_url("sqlite:////x/r.db").database == "/x/r.db"
    for bad, words in [
        ("mysql://u@h/db", "'mysql'"),
        ("not a url", "not a database URL"),
        ("sqlite://", "needs a file path"),
    ]:
        with pytest.raises(ValueError, match=words):
            engine_url(bad)


def test_default_registry_is_a_sqlite_file_under_its_data_dir(tmp_path: Path) -> None:
    assert RegistryConfig(data_dir=tmp_path).resolved_url() == f"sqlite:///{tmp_path}/registry.db"
    assert RegistryConfig(url="postgresql://h/db").resolved_url() == "postgresql://h/db"


def test_migrations_are_idempotent_and_the_file_is_private(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'r.db'}"
    engine = open_database(url)
    assert migrate(engine) == migrate(engine) == "0006"
    assert (tmp_path / "sub" / "r.db").stat().st_mode & 0o077 == 0
    names = set(sa.inspect(engine).get_table_names())
    assert {"model_versions", "deployments", "usage", "audit_events", "alembic_version"} <= names


@pytest.mark.parametrize("cut_short", [False, True])
def test_an_upgrade_from_0005_keeps_its_versions_as_openai_servers_without_a_key(
    tmp_path: Path, cut_short: bool
) -> None:
    # '' reads back as before the columns existed: dialect openai, no API version, no key.
    assert upgraded_from_0005(f"sqlite:///{tmp_path / 'r.db'}", cut_short=cut_short) == AT_0005


def test_an_unreachable_postgresql_is_unavailable_naming_it() -> None:
    with pytest.raises(Unavailable, match=r"registry database postgresql\+psycopg://u:\*\*\*@"):
        open_database("postgresql://u:secret@127.0.0.1:9/db")


def test_prices_are_exact_decimals_and_refused_by_name() -> None:
    assert parse_price("", "p") == 0
    assert price_text(parse_price("0.000500", "p")) == "0.0005"
    assert price_text(parse_price("1E+2", "p")) == "100"
    for bad in ("abc", "-1", "NaN", "Infinity", "0.0000000000001", "1000001"):
        with pytest.raises(InvalidArgument, match="input_price"):
            parse_price(bad, "input_price")
    v = draft(input_price_per_1k=Decimal("0.5"), output_price_per_1k=Decimal("1.5"))
    assert v.cost(1000, 2000) == Decimal("3.5")


def test_validate_draft_settles_the_context_limit_and_names_wrong_fields() -> None:
    assert draft().context_length == 8192
    assert draft(context_length=1024).context_length == 1024
    cases: list[tuple[dict[str, object], str]] = [
        ({"name": "Bad Name"}, "model_version.name"),
        ({"version": "-1"}, "model_version.version"),
        ({"kind": "chat"}, "model_version.kind"),
        ({"context_length": 9000}, "above the artifact's own limit of 8192"),
        ({"artifact": REMOTE}, "context_length is required"),
        ({"input_schema": "[1]"}, "input_schema must be a JSON Schema object"),
        ({"output_schema": "{"}, "output_schema is not JSON"),
        ({"currency": "usd"}, "currency"),
        ({"tags": ("a", "a")}, "duplicates"),
        ({"tags": ("bad tag",)}, r"tags\[0\]"),
        ({"description": "x" * 5000}, "description has 5000 characters"),
    ]
    for fields, words in cases:
        with pytest.raises(InvalidArgument, match=words):
            draft(**fields)


def test_register_get_and_duplicates(store: ModelVersionStore) -> None:
    v = store.register(draft(tags=("int4",), input_price_per_1k=Decimal("0.25")), "alice@t")
    assert (v.generation, v.created_by, v.state) == (1, "alice@t", "active")
    got = store.get("m", "1")
    assert got == v and got.input_price_per_1k == Decimal("0.25") and got.tags == ("int4",)
    with pytest.raises(AlreadyExists, match="'m' already has a version '1'"):
        store.register(draft(description="other"), "bob@t")
    assert store.get("m", "1").description == ""
    with pytest.raises(NotFound, match="'m' has no version '2'"):
        store.get("m", "2")


def test_a_remote_servers_dialect_api_version_and_key_variable_round_trip(
    store: ModelVersionStore,
) -> None:
    azure = Artifact(
        "remote",
        "https://res.openai.azure.com/openai/deployments/gpt-4o",
        "openai_http",
        remote_dialect="azure",
        remote_api_version="2024-10-21",
        remote_api_key_env="AZURE_OPENAI_KEY",
    )
    checked = dataclasses.replace(REMOTE, artifact=azure)
    v = store.register(draft("az", artifact=checked, context_length=8192), "alice@t")
    assert store.get("az", "1") == v and store.get("az", "1").artifact.artifact == azure
    (event,) = audit.events(store.engine, target="az/1")
    assert event.after["artifact_remote_api_key_env"] == "AZURE_OPENAI_KEY"


def test_list_filters_and_pages(store: ModelVersionStore) -> None:
    for name, version, tags in [("b", "1", ("x",)), ("a", "1", ()), ("a", "2", ("x",))]:
        store.register(draft(name, version, tags=tags), "me")
    store.deprecate("a", "1", "old", "me")
    keys = lambda vs: [v.key for v in vs]  # noqa: E731
    assert keys(store.list()[0]) == ["a/2", "b/1"]
    assert keys(store.list(include_deprecated=True)[0]) == ["a/1", "a/2", "b/1"]
    assert keys(store.list(name="a", include_deprecated=True)[0]) == ["a/1", "a/2"]
    assert keys(store.list(tag="x")[0]) == ["a/2", "b/1"]
    assert store.list(kind="embed")[0] == []
    seen, token = [], ""
    while True:
        page, token = store.list(include_deprecated=True, page_size=1, page_token=token)
        seen += keys(page)
        if not token:
            break
    assert seen == ["a/1", "a/2", "b/1"]
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list(page_token="garbage")
    with pytest.raises(InvalidArgument, match="page_size"):
        store.list(page_size=5000)


def test_update_deprecate_delete_each_leave_an_audit_event(store: ModelVersionStore) -> None:
    store.register(draft(), "alice@t")
    v = store.update("m", "1", {"description": "new", "tags": ("a",)}, "bob@t")
    assert (v.description, v.tags, v.generation) == ("new", ("a",), 2)
    with pytest.raises(InvalidArgument, match=r"\['context_length'\], which cannot change"):
        store.update("m", "1", {"context_length": 5}, "bob@t")
    with pytest.raises(Aborted, match="is at generation 2, not 1"):
        store.update("m", "1", {"description": "x"}, "bob@t", expected_generation=1)
    d = store.deprecate("m", "1", "use 2", "carol@t")
    assert (d.state, d.deprecation_reason, d.generation) == (DEPRECATED, "use 2", 3)
    store.delete("m", "1", "dave@t")
    with pytest.raises(NotFound):
        store.delete("m", "1", "dave@t")
    events = audit.events(store.engine, target="m/1")
    assert [(e.action, e.actor) for e in events] == [
        ("model_version.register", "alice@t"),
        ("model_version.update", "bob@t"),
        ("model_version.deprecate", "carol@t"),
        ("model_version.delete", "dave@t"),
    ]
    assert events[1].before == {
        "description": "",
        "tags": "[]",
        "generation": 1,
        "updated_at": 1000.0,
    }
    assert events[1].after["description"] == "new" and events[1].after["generation"] == 2
    assert events[3].after == {} and events[3].before["state"] == DEPRECATED


def test_concurrent_changes_one_wins_the_other_is_aborted(store: ModelVersionStore) -> None:
    store.register(draft(), "me")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def change(i: int) -> None:
        barrier.wait()
        try:
            store.update("m", "1", {"description": str(i)}, "me", expected_generation=1)
            results.append("ok")
        except Aborted:
            results.append("aborted")

    threads = [threading.Thread(target=change, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["aborted"] * 7 + ["ok"]
    assert store.get("m", "1").generation == 2


def test_processes_creating_one_registry_together_all_succeed(tmp_path: Path) -> None:
    # Routers started together (--workers, the e2e tests) migrate a new SQLite file at once.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=open_database, args=(url,)) for _ in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]

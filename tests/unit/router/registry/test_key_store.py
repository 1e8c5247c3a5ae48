"""The API-key registry: keys are shown once, stored as hashes, and revocation (from any
process) takes effect on the next verification."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa

from router.errors import NotFound, Unavailable
from router.guard.config import STANDALONE_KEYS, AuthSection, keys_location
from router.registry import audit
from router.registry.config import RegistryConfig
from router.registry.database import migrate, open_database
from router.registry.keys import KeyStore, looks_like_api_key, open_key_store


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "registry" / "keys.db")


def test_create_verify_list_revoke(store: KeyStore) -> None:
    key_id, key = store.create("acme", ["generate", "embed"], tier="premium", name="ci bot")
    assert looks_like_api_key(key) and key.startswith(f"irk_{key_id}_")
    record = store.verify(key)
    assert record is not None
    assert (record.key_id, record.tenant, record.scopes, record.tier, record.name) == (
        key_id,
        "acme",
        frozenset({"generate", "embed"}),
        "premium",
        "ci bot",
    )
    other_id, _ = store.create("beta", [])
    assert [r.key_id for r in store.list()] == [key_id, other_id]
    assert store.revoke(key_id) is True
    assert store.verify(key) is None
    assert store.revoke(key_id) is False  # already revoked: idempotent
    listed = {r.key_id: r for r in store.list()}
    assert listed[key_id].revoked and not listed[other_id].revoked
    store.close()


def test_only_a_hash_reaches_the_disk(store: KeyStore) -> None:
    _, key = store.create("acme", ["generate"])
    assert store.verify(key) is not None
    store.close()
    files = list(store.path.parent.iterdir())
    on_disk = b"".join(path.read_bytes() for path in files)
    secret = key[-43:]  # token_urlsafe(32), which may itself hold "_": not rsplit("_")
    assert b"acme" in on_disk  # the files are the ones written
    assert key.encode() not in on_disk
    assert secret.encode() not in on_disk
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_revocation_by_another_connection_takes_effect_at_once(tmp_path: Path) -> None:
    router = KeyStore(tmp_path / "keys.db")
    key_id, key = router.create("acme", ["generate"])
    assert router.verify(key) is not None  # now cached
    cli = KeyStore(tmp_path / "keys.db")
    cli.revoke(key_id)
    assert router.verify(key) is None
    cli.close()
    router.close()


def test_cached_verification_does_not_query_the_key_row(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key = store.create("acme", ["generate"])
    lookups = 0
    real_get = store._table.get

    def counting_get(key_id: str) -> object:
        nonlocal lookups
        lookups += 1
        return real_get(key_id)

    monkeypatch.setattr(store._table, "get", counting_get)
    for _ in range(5):
        assert store.verify(key) is not None
    assert lookups == 1
    store.close()


def test_wrong_or_malformed_keys_do_not_verify(store: KeyStore) -> None:
    key_id, key = store.create("acme", ["generate"])
    _, other = store.create("acme", ["generate"])
    # A real key id with someone else's secret.
    assert store.verify(f"irk_{key_id}_{other.rsplit('_', 1)[1]}") is None
    for bad in ("", "irk_", key + "x", key[:-1], "sk-" + key[4:], f"irk_{'0' * 16}_{'a' * 43}"):
        assert store.verify(bad) is None, bad
    assert store.verify(key) is not None
    store.close()


@pytest.mark.parametrize(
    ("tenant", "scopes", "tier", "name", "message"),
    [
        ("", ["generate"], "default", "", "tenant '' is not valid"),
        ("acme corp", ["generate"], "default", "", "tenant 'acme corp' is not valid"),
        ("acme", ["gen erate"], "default", "", "scope 'gen erate' is not valid"),
        ("acme", ["generate"], "", "", "tier '' is not valid"),
        ("acme", ["generate"], "default", "a\nb", "printable"),
    ],
)
def test_create_validates_its_inputs(
    store: KeyStore, tenant: str, scopes: list[str], tier: str, name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.create(tenant, scopes, tier=tier, name=name)
    assert store.list() == []
    store.close()


def test_revoking_an_unknown_key_names_it(store: KeyStore) -> None:
    with pytest.raises(NotFound, match="no API key with id 'nope'"):
        store.revoke("nope")
    store.close()


def test_an_unreadable_registry_is_unavailable_not_an_unknown_key(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key = store.create("acme", ["generate"])

    def locked() -> int:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store._table, "data_version", locked)
    with pytest.raises(Unavailable, match="registry cannot be read"):
        store.verify(key)
    store.close()


def test_keys_live_in_the_registry_database_unless_a_file_of_their_own_is_named(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'registry.db'}"
    registry = RegistryConfig(url=url)
    assert keys_location(AuthSection(), registry) == url
    own = AuthSection(registry=tmp_path / "own.db")
    assert keys_location(own, registry) == tmp_path / "own.db"
    off = RegistryConfig(enabled=False)
    assert keys_location(AuthSection(), off) == STANDALONE_KEYS.expanduser()
    # The key store may open the registry's file before the registry migrates it: one table.
    store = open_key_store(url)
    _, key = store.create("acme", {"inference:embed"})
    engine = open_database(url)
    try:
        assert migrate(engine) == "0006"
        with engine.connect() as connection:
            tenants = connection.execute(sa.text("SELECT tenant FROM api_keys")).scalars()
            assert list(tenants) == ["acme"]
    except BaseException:
        engine.dispose()
        raise
    record = store.verify(key)
    assert record is not None and record.tenant == "acme"
    # Changes to keys are audit events of the registry, in the change's transaction.
    key_id, _ = store.create("globex", {"admin"}, actor="cli:ops")
    store.revoke(key_id, actor="cli:ops")
    events = audit.events(engine, target=f"api_key/{key_id}")
    assert [(e.action, e.actor) for e in events] == [
        ("api_key.create", "cli:ops"),
        ("api_key.revoke", "cli:ops"),
    ]
    assert events[0].after["tenant"] == "globex" and "hash" not in str(events[0].after)
    engine.dispose()
    store.close()
    with pytest.raises(ValueError, match=r"registry\.url uses 'mysql'"):
        open_key_store("mysql://h/db")

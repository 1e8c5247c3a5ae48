"""`irouter keys create|revoke|list` round trip through register_cli/run_cli."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from router.keys_cli import register_cli, run_cli
from router.registry.keys import KeyStore


def run(argv: list[str], default_db: Path) -> int:
    parser = argparse.ArgumentParser(prog="irouter")
    register_cli(parser.add_subparsers(dest="command", required=True), default_db=default_db)
    return run_cli(parser.parse_args(argv))


def test_create_list_revoke_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "keys.db"
    argv = ["keys", "create", "--tenant", "acme", "--scopes", "generate, embed", "--tier", "gold"]
    assert run([*argv, "--name", "ci"], db) == 0
    created = capsys.readouterr()
    fields = dict(line.split(": ", 1) for line in created.out.strip().splitlines())
    key_id, key = fields["key id"].strip(), fields["api key"].strip()
    assert fields["scopes"].strip() == "embed,generate"
    assert "cannot be shown again" in created.err
    store = KeyStore(db)
    record = store.verify(key)
    assert record is not None and record.tier == "gold" and record.name == "ci"

    assert run(["keys", "list"], db) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "active" in listing and "acme" in listing
    assert key[-43:] not in listing  # the secret: token_urlsafe(32) may hold "_" itself

    assert run(["keys", "revoke", key_id], db) == 0
    assert f"revoked key {key_id}" in capsys.readouterr().out
    assert store.verify(key) is None  # the open store sees the CLI's revocation at once
    assert run(["keys", "list"], db) == 0
    assert "revoked" in capsys.readouterr().out
    store.close()


def test_errors_exit_non_zero_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "keys.db"
    assert run(["keys", "revoke", "0123456789abcdef"], db) == 1
    assert "no API key with id '0123456789abcdef'" in capsys.readouterr().err
    assert run(["keys", "create", "--tenant", "bad tenant", "--scopes", "x"], db) == 2
    assert "tenant 'bad tenant' is not valid" in capsys.readouterr().err


def test_db_flag_overrides_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.db"
    assert (
        run(
            ["keys", "--db", str(other), "create", "--tenant", "t", "--scopes", "a"],
            tmp_path / "d.db",
        )
        == 0
    )
    assert other.exists() and not (tmp_path / "d.db").exists()
    capsys.readouterr()
    assert run(["keys", "list"], tmp_path / "d.db") == 0
    assert "(no keys)" in capsys.readouterr().out

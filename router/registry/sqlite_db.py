"""All SQL of the API-key registry, behind `SqliteKeyTable`. The cluster version replaces this
module with a PostgreSQL one offering the same methods; nothing else in the registry writes SQL.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    key_hash    BLOB NOT NULL,
    tenant      TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    tier        TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant);
"""


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One row of `api_keys`, as stored (scopes space-separated)."""

    key_id: str
    key_hash: bytes
    tenant: str
    scopes: str
    tier: str
    name: str
    created_at: float
    revoked_at: float | None


_COLUMNS = "key_id, key_hash, tenant, scopes, tier, name, created_at, revoked_at"


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """The audit event of a change to a key (router.registry.audit's fields)."""

    at: float
    actor: str
    action: str
    target: str
    before: dict[str, Any]
    after: dict[str, Any]


class SqliteKeyTable:
    """The `api_keys` table in one SQLite file, shared by the router and the `irouter keys` CLI.

    One connection guarded by a lock: the router calls in from its event-loop thread, tests and
    tools from others, and sqlite3 connections must not be used by two threads at once.
    """

    remote = False
    """Reads are local and take microseconds: verification runs them on the event loop."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # The file holds only hashes, but tenants, scopes and key ids are nobody else's
            # business either: create it readable by its owner only (SQLite gives its -wal and
            # -shm files the same mode).
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            # WAL: the router's reads never wait for the CLI's writes, nor the other way round.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection (another process) has committed a
        change to the file since this connection last looked. Cheap: no disk read."""
        with self._lock:
            row = self._db.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def insert(self, row: KeyRow, event: KeyEvent | None = None) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.key_id,
                    row.key_hash,
                    row.tenant,
                    row.scopes,
                    row.tier,
                    row.name,
                    row.created_at,
                    row.revoked_at,
                ),
            )
            self._audit(event)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (hold the lock): a change and its audit event."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _audit(self, event: KeyEvent | None) -> None:
        """Record `event` in the transaction when the file is the registry's (it has the audit
        log); a key file of its own has none."""
        audited = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_events'"
        ).fetchone()
        if event is None or not audited:
            return
        self._db.execute(
            "INSERT INTO audit_events (at, actor, action, target, before, after) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                event.at,
                event.actor,
                event.action,
                event.target,
                json.dumps(event.before, sort_keys=True),
                json.dumps(event.after, sort_keys=True),
            ),
        )

    def get(self, key_id: str) -> KeyRow | None:
        with self._lock:
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if found is None else KeyRow(*found)

    def revoke(self, key_id: str, at: float, event: KeyEvent | None = None) -> bool:
        """Mark the key revoked; False when there is no such key or it already was (then no
        event is recorded)."""
        with self._lock, self._transaction():
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (at, key_id),
            )
            if cursor.rowcount != 1:
                return False
            self._audit(event)
        return True

    def all(self) -> list[KeyRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys ORDER BY tenant, created_at"
            ).fetchall()
        return [KeyRow(*row) for row in rows]

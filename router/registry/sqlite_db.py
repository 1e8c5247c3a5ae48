"""All SQL of the API-key registry, behind `SqliteKeyTable`. The cluster version replaces this
module with a PostgreSQL one offering the same methods; nothing else in the registry writes SQL.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

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

    def insert(self, row: KeyRow) -> None:
        with self._lock:
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

    def get(self, key_id: str) -> KeyRow | None:
        with self._lock:
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if found is None else KeyRow(*found)

    def revoke(self, key_id: str, at: float) -> bool:
        """Mark the key revoked; False when there is no such key or it already was."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (at, key_id),
            )
        return cursor.rowcount == 1

    def all(self) -> list[KeyRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys ORDER BY tenant, created_at"
            ).fetchall()
        return [KeyRow(*row) for row in rows]

"""The API keys' table in the registry's PostgreSQL database: the same methods as
`SqliteKeyTable` (router.registry.sqlite_db), so that `KeyStore` serves a cluster's routers
from one shared table.

Revocation must reach every router. SQLite tells a connection that another one committed
(`PRAGMA data_version`) for free on every verification; PostgreSQL would need a round trip, which
must not run per call on the event loop. So a thread polls the number of revoked keys every
`poll_s` (revocations are never undone, so the count only grows), and `data_version` returns the
last count: a key revoked through another router or `irouter keys revoke` stops working here
within `poll_s` (0.5 s by default); revoked through this store, at once (KeyStore's epoch).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from router.registry import audit
from router.registry.database import reachable
from router.registry.schema import api_keys as table
from router.registry.sqlite_db import KeyEvent, KeyRow

logger = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the revoked keys are counted (the longest a revocation elsewhere takes here)."""


class PostgresKeyTable:
    """`api_keys` in the registry database (see the module docstring). Statements block: the
    key store runs them on the registry's threads, never on the event loop."""

    remote = True
    """Reads are round trips to a server: a cache miss is looked up off the event loop."""

    def __init__(self, engine: Engine, *, poll_s: float = POLL_S) -> None:
        self._engine = engine
        self.path = engine.url.render_as_string(hide_password=True)
        """Where the keys are, for messages (no password)."""
        self._poll_s = poll_s
        self._revoked = self._count_revoked()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="api-key-revocations", daemon=True)
        self._poller.start()

    def close(self) -> None:
        """Stop polling and close the engine's connections (the table owns its engine)."""
        self._stop.set()
        self._poller.join(timeout=5.0)
        self._engine.dispose()

    def data_version(self) -> int:
        """The number of revoked keys at the last poll: it changes when a key was revoked."""
        return self._revoked

    def _count_revoked(self) -> int:
        statement = sa.select(sa.func.count()).where(table.c.revoked_at.is_not(None))
        with self._engine.connect() as connection:
            return int(connection.execute(statement).scalar_one())

    def _poll(self) -> None:
        failing = False
        while not self._stop.wait(self._poll_s):
            try:
                self._revoked = self._count_revoked()
            except sa.exc.SQLAlchemyError as exc:
                # Keys verified before stay valid until the database is back: a router must not
                # refuse every caller because its registry restarts.
                if not failing:
                    logger.warning("cannot read API key revocations from %s: %s", self.path, exc)
                failing = True
                continue
            if failing:
                logger.info("API key revocations from %s are read again", self.path)
            failing = False

    # Statements go through `reachable`: a database that cannot be reached is Unavailable
    # (the caller's key may be fine, so this must not read as "unknown key").

    def insert(self, row: KeyRow, event: KeyEvent | None = None) -> None:
        with reachable(self._engine) as connection:
            connection.execute(table.insert().values(**dataclasses.asdict(row)))
            _audit(connection, event)

    def get(self, key_id: str) -> KeyRow | None:
        with reachable(self._engine) as connection:
            found = connection.execute(sa.select(table).where(table.c.key_id == key_id)).first()
        return None if found is None else KeyRow(*found)

    def revoke(self, key_id: str, at: float, event: KeyEvent | None = None) -> bool:
        """Mark the key revoked; False when there is no such key or it already was."""
        statement = (
            table.update()
            .where(table.c.key_id == key_id, table.c.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        with reachable(self._engine) as connection:
            if connection.execute(statement).rowcount != 1:
                return False
            _audit(connection, event)
        return True

    def all(self) -> list[KeyRow]:
        statement = sa.select(table).order_by(table.c.tenant, table.c.created_at)
        with reachable(self._engine) as connection:
            return [KeyRow(*row) for row in connection.execute(statement)]


def _audit(connection: Connection, event: KeyEvent | None) -> None:
    if event is not None:
        audit.record(
            connection,
            at=event.at,
            actor=event.actor,
            action=event.action,
            target=event.target,
            before=event.before,
            after=event.after,
        )

"""The registry database: one SQLAlchemy engine over SQLite (the default: a file under the data
dir, no server) or PostgreSQL (a cluster's replicas share it), its schema brought to the newest
Alembic revision when it is opened.

Why SQLAlchemy Core and Alembic rather than plain SQL per driver: the same statements run on
both databases (SQLite for the laptop, PostgreSQL for clusters), and Alembic is the field's
versioned-migration tool, so an upgrade of a registry written by an older router is one
`upgrade head`. The ORM is not used: the registry's rows are few and its statements simple.

Control-plane calls are rare, so statements run on a worker thread (`asyncio.to_thread`), never
on the event loop, and never on a data-plane call's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from router.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
CALL_TIMEOUT_S = 10.0
"""Longest a control-plane statement may take before its call is refused as UNAVAILABLE."""
_calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="registry")
"""The registry's own threads: a database that hangs (a paused server answers nothing, and a
pooled connection's ping then blocks) holds these, never the default executor that model
loading and retrieval share."""
_PG_LOCK = 0x69726F75  # "irou": the advisory lock replicas take to migrate one at a time


def engine_url(url: str) -> sa.URL:
    """`url` as SQLAlchemy takes it: `postgresql://` means psycopg 3 (the driver installed with
    the router); `sqlite:///path` is a file. Raises ValueError naming what is wrong."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(
            f"registry.url={url!r} is not a database URL; use sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DB"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "postgresql+psycopg"):
        raise ValueError(
            f"registry.url uses {parsed.drivername!r}; the registry runs on sqlite:// or "
            "postgresql:// (psycopg 3)"
        )
    if parsed.drivername == "sqlite" and not parsed.database:
        raise ValueError("registry.url sqlite:// needs a file path (sqlite:///PATH)")
    return parsed


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    # WAL: readers never block the writer (the router reads while `irouter` CLIs write);
    # busy_timeout: a writer waits for another process's write instead of failing at once.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: str) -> Engine:
    """An engine on `url` (see engine_url); a SQLite file and its folder are created, readable
    by their owner only."""
    parsed = engine_url(url)
    if parsed.drivername == "sqlite":
        path = Path(str(parsed.database)).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = sa.create_engine(parsed.set(database=str(path)))
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: a connection the server closed (restart, idle timeout) is replaced, not used.
    return sa.create_engine(
        parsed, pool_pre_ping=True, pool_size=2, max_overflow=4, connect_args={"connect_timeout": 5}
    )


@contextlib.contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """Processes sharing one SQLite file (`--workers`, routers started together, the CLI)
    migrate one at a time: an exclusive lock on a file beside it. SQLite would otherwise let
    two of them create the same table, and the second fail."""
    if engine.dialect.name != "sqlite":
        yield
        return
    import fcntl

    path = Path(str(engine.url.database)).with_suffix(".migrate.lock")
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def migrate(engine: Engine) -> str:
    """Bring the schema to the newest revision; returns it. Replicas starting together on one
    PostgreSQL migrate one at a time (an advisory lock held for the transaction)."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    with _sqlite_migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        revision = MigrationContext.configure(connection).get_current_revision()
    return revision or ""


def open_database(url: str) -> Engine:
    """The engine on `url`, migrated (see open_schema); ValueError when the URL is wrong."""
    engine = create_engine(url)
    try:
        open_schema(engine)
    except Unavailable:
        engine.dispose()
        raise
    return engine


def open_schema(engine: Engine) -> None:
    """Migrate `engine`'s database to the newest schema. Raises Unavailable naming the URL
    (without its password) when the database cannot be reached."""
    try:
        revision = migrate(engine)
    except sa.exc.OperationalError as exc:
        raise Unavailable(
            f"the registry database {engine.url.render_as_string(hide_password=True)} cannot "
            f"be reached: {_first_line(exc)}"
        ) from None
    logger.info(
        "registry %s at schema revision %s",
        engine.url.render_as_string(hide_password=True),
        revision,
    )


def _first_line(exc: sa.exc.DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)


@contextlib.contextmanager
def reachable(engine: Engine) -> Iterator[Connection]:
    """A transaction on `engine`; a database that cannot be reached (down, restarting, network)
    becomes Unavailable, so a change is refused by name while the data plane serves on."""
    try:
        with engine.begin() as connection:
            yield connection
    except sa.exc.OperationalError as exc:
        raise Unavailable(
            f"the registry database cannot be reached: {_first_line(exc)}; retry when it is back",
            retry_after_s=1.0,
        ) from None
    except sa.exc.TimeoutError:  # every pooled connection is held by a statement that hangs
        raise Unavailable(
            "the registry database does not answer (no free connection); retry later",
            retry_after_s=1.0,
        ) from None


async def call(fn: Callable[..., T], *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> T:
    """fn(*args) on the registry's threads; Unavailable when it takes over `timeout_s` (the
    statement may still complete later, so a change is then of unknown outcome)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            return await loop.run_in_executor(_calls, functools.partial(fn, *args))
    except TimeoutError:
        raise Unavailable(
            f"the registry database did not answer within {timeout_s:g} s; a change may or may "
            "not have been applied: read it back before retrying",
            retry_after_s=timeout_s,
        ) from None

"""The PostgreSQL test server (tests/postgres_server.py) that the registry's tests stand on:
reachable through psycopg and SQLAlchemy's URL, a fresh database per test, data that outlives a
restart or a crash on the same port, and a pause that stalls even open connections."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy

from tests.postgres_server import PostgresServer, postgres_path, running_postgres

pytestmark = pytest.mark.skipif(
    postgres_path() is None,
    reason="needs PostgreSQL's initdb and postgres ($PG_BIN or Debian's postgresql package)",
)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A server of this test alone, for tests that restart, kill or freeze it."""
    with running_postgres(tmp_path / "postgres") as server:
        yield server


def count_rows(url: str) -> int:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text("SELECT count(*) FROM items")).scalar_one())
    finally:
        engine.dispose()


def insert_row(url: str) -> None:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS items (id serial)"))
            conn.execute(sqlalchemy.text("INSERT INTO items DEFAULT VALUES"))
    finally:
        engine.dispose()


def test_psycopg_connects_to_the_dsn(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.dsn) as conn:
        row = conn.execute("SELECT current_user, current_database(), 6 * 7").fetchone()
    assert row == ("postgres", "postgres", 42)


def test_each_created_database_is_fresh_and_reached_through_its_sqlalchemy_url(
    postgres: PostgresServer,
) -> None:
    first = postgres.create_database("first")
    second = postgres.create_database("second")
    assert first == f"postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/first"
    insert_row(first)
    insert_row(first)
    insert_row(second)
    assert (count_rows(first), count_rows(second)) == (2, 1)
    with pytest.raises(psycopg.errors.DuplicateDatabase):
        postgres.create_database("first")


def test_restart_and_a_crash_keep_the_data_and_the_port(own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("kept")
    port = own_postgres.port
    insert_row(url)
    own_postgres.restart()
    insert_row(url)
    own_postgres.kill()
    assert not own_postgres.alive
    own_postgres.restart()
    assert own_postgres.port == port
    assert count_rows(url) == 2


def test_a_paused_server_answers_nothing_until_resumed(own_postgres: PostgresServer) -> None:
    with psycopg.connect(own_postgres.dsn, autocommit=True) as conn:
        answers: list[object] = []
        with own_postgres.paused():
            query = threading.Thread(
                target=lambda: answers.append(conn.execute("SELECT 1").fetchone())
            )
            query.start()
            query.join(0.5)
            assert query.is_alive(), "an open connection was answered by a paused server"
        query.join(10)
        assert answers == [(1,)]

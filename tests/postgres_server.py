"""A real PostgreSQL server for tests: its own process on a free port, its own data directory
(initdb once per directory), fsync off, stopped at the end.

    with running_postgres(tmp_path) as server:
        engine = sqlalchemy.create_engine(server.create_database("registry"))

`kill()`, `pause()`/`resume()` and `restart()` let tests break it on purpose; they signal the
postmaster and every backend, so a paused server answers nothing, not even on open connections,
and a killed one leaves no backend behind to hold the data directory. `restart()` keeps the data
and the port. Tests that need one skip when no PostgreSQL binaries exist (`postgres_path()` is
None).

PostgreSQL refuses to run as root: when the tests do, initdb and postgres run as the `postgres` OS
user (Debian's package creates it), which then owns the data directory and must be able to reach
it: the directories above it get the others-may-traverse bit (x, not r) where they lack it, as
pytest's 0700 temp directories do.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import psycopg
from psycopg import sql

from loadtest.processes import free_port
from tests.server_process import ServerProcess

SUPERUSER = "postgres"
"""The database superuser initdb creates (trust authentication: no password)."""
OS_USER = "postgres"
"""The OS user that initdb and postgres run as when the tests run as root."""


def postgres_path() -> str | None:
    """The postgres server binary, with initdb beside it ($PG_BIN, then the newest Debian
    /usr/lib/postgresql/*/bin, then PATH), or None."""
    candidates = [Path(os.environ["PG_BIN"])] if os.environ.get("PG_BIN") else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "postgres")):
            return str(bin_dir / "postgres")
    return None


def _version(bin_dir: Path) -> list[int]:
    """/usr/lib/postgresql/15/bin -> [15] (9.6 -> [9, 6])."""
    return [int(n) for n in re.findall(r"\d+", bin_dir.parent.name)]


def _ready(dsn: str) -> bool:
    """A connection completes PostgreSQL's startup (not only TCP) and the server takes queries."""
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


class PostgresServer(ServerProcess):
    """One postgres process bound to 127.0.0.1 on `port` (TCP only, no Unix socket), its
    cluster in `directory`/data."""

    start_timeout_s = 30.0
    probe_interval_s = 0.05
    stop_timeout_s = 10.0
    port_attempts = 5

    def __init__(self, directory: Path, *, executable: str | None = None) -> None:
        super().__init__("postgres")
        self.directory = directory
        self.executable = executable or postgres_path() or "postgres"
        self._keep_port = 0

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (initdb's -D)."""
        return self.directory / "data"

    @property
    def url(self) -> str:
        """SQLAlchemy's URL of the `postgres` database (postgresql+psycopg://...)."""
        return self._url("postgresql+psycopg", "postgres")

    @property
    def dsn(self) -> str:
        """libpq's (and psycopg's) URL of the `postgres` database."""
        return self._url("postgresql", "postgres")

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (a fresh, empty one per test) and return its SQLAlchemy URL."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self._url("postgresql+psycopg", name)

    def start(self) -> Self:
        """initdb (once per directory), then start on a free port (the same one when
        restarting); retried if another process takes the port between choosing and binding it."""
        self._initdb()
        self._keep_port = self.port
        return super().start()

    def restart(self) -> Self:
        """Start again on the same port and data (after kill() or stop())."""
        self.stop()
        return self.start()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: end the sessions, checkpoint, exit), then the base class's
        SIGTERM and SIGKILL; SIGTERM alone is a smart shutdown, which waits for every client."""
        family = _family(self._running().pid) if self.alive else []
        _signal(family, signal.SIGCONT)  # in case a test left it paused
        _signal(family[:1], signal.SIGINT)
        super().stop()
        _signal(family, signal.SIGKILL)  # backends left behind, had SIGKILL been needed

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and every backend; the next start recovers."""
        if self.alive:
            _signal(_family(self._running().pid), signal.SIGKILL)
        super().kill()

    def pause(self) -> None:
        """A hang: SIGSTOP to the postmaster and every backend. The kernel still accepts
        connections; nothing answers, on new connections or open ones."""
        _signal(_family(self._running().pid), signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause() (harmless when not paused)."""
        if self.alive:
            _signal(_family(self._running().pid), signal.SIGCONT)

    def _url(self, scheme: str, database: str) -> str:
        return f"{scheme}://{SUPERUSER}@{self.address}/{database}"

    def _initdb(self) -> None:
        """Create the cluster unless `data_dir` holds one: trust authentication, C locale, no
        fsync (initdb takes seconds; a restart reuses it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _let_traverse(self.directory)
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            user = _os_user()
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        initdb = str(Path(self.executable).with_name("initdb"))
        command = [initdb, "-D", str(self.data_dir), "-A", "trust", "-U", SUPERUSER]
        command += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        done = subprocess.run(
            _as_server_user(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace")
            raise RuntimeError(f"initdb failed for {self.data_dir}:\n{output}")

    def _choose_ports(self) -> None:
        self.port = self._keep_port or free_port()

    def _command(self) -> list[str]:
        # setpriv execs (runuser would fork), so the pid is the postmaster's, the parent of the
        # backends that kill() and pause() signal too.
        # TCP only: a Unix socket under a long pytest path can pass the 107-byte limit.
        # fsync and full_page_writes are off: nothing here must survive a power cut, only a crash
        # of postgres (kill()), which the OS page cache outlives. synchronous_commit stays on: it
        # costs a write() per commit without fsync, and with it off kill() would lose the
        # commits of the last ~0.6 s, still in postgres's WAL buffers.
        return _as_server_user([
            self.executable,
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
        ])  # fmt: skip

    def _readiness(self) -> contextlib.AbstractContextManager[Callable[[], bool]]:
        """A connection to the `postgres` database runs SELECT 1."""
        return contextlib.nullcontext(lambda: _ready(self.dsn))


def _os_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL refuses to run as root and there is no OS user {OS_USER!r} to run it as "
            "(Debian's postgresql package creates it; or run the tests as another user)"
        ) from None


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the `postgres` OS user when running as root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return command
    user = _os_user().pw_name
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *command]


def _family(postmaster: int) -> list[int]:
    """The postmaster, then its children: backends, walwriter, checkpointer... (each calls
    setsid(), so a process group would not hold them). The postmaster is stopped first, so that
    it forks no child that the list would miss; SIGCONT (or SIGKILL) it, or it stays stopped."""
    _signal([postmaster], signal.SIGSTOP)
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat_file.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat_file.parent.name))
    return [postmaster, *children]


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _let_traverse(directory: Path) -> None:
    """Give others the search (x) bit on `directory` and every directory above it that lacks it,
    so the `postgres` OS user can reach its data directory inside."""
    resolved = directory.resolve()
    for path in (resolved, *resolved.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@contextlib.contextmanager
def running_postgres(directory: Path) -> Iterator[PostgresServer]:
    """A started PostgresServer, stopped when the block ends."""
    with PostgresServer(directory).started() as server:
        yield server

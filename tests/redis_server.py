"""A real redis-server for tests and benchmarks: its own process on a free port, its own temp
dir, no persistence, stopped at the end.

    with running_redis(tmp_path) as server:
        client = redis.asyncio.Redis.from_url(server.url)

`kill()`, `pause()`/`resume()` (SIGSTOP/SIGCONT: a server that accepts but never answers) and
`restart()` let tests break it on purpose. Tests that need one skip when no redis-server binary
exists (`redis_server_path()` is None).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

from loadtest.processes import free_port
from tests.server_process import ServerProcess


def redis_server_path() -> str | None:
    """The redis-server binary ($REDIS_SERVER, then PATH, then Debian's), or None."""
    candidates = [os.environ.get("REDIS_SERVER"), shutil.which("redis-server")]
    candidates.append("/usr/bin/redis-server")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(ServerProcess):
    """One redis-server process bound to 127.0.0.1 on `port`, files under `directory` (its log
    too: `--logfile`, which output() reads)."""

    start_timeout_s = 10.0
    probe_interval_s = 0.01
    stop_timeout_s = 5.0
    port_attempts = 5
    captures_output = False

    def __init__(self, directory: Path, *, executable: str | None = None) -> None:
        super().__init__("redis-server")
        self.directory = directory
        self.executable = executable or redis_server_path() or "redis-server"
        self._keep_port = 0

    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"

    def start(self) -> Self:
        """Start on a free port (a new one unless restarting); retried if another process takes
        the port between choosing and binding it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._keep_port = self.port
        return super().start()

    def restart(self) -> Self:
        """Start again on the same port (after kill() or stop()), empty."""
        self.stop()
        return self.start()

    def output(self) -> str:
        """The end of its log file."""
        with contextlib.suppress(OSError):
            return self._log_path.read_text(errors="replace")[-self.output_chars :]
        return ""

    @property
    def _log_path(self) -> Path:
        return self.directory / "redis.log"

    def _choose_ports(self) -> None:
        self.port = self._keep_port or free_port()

    def _command(self) -> list[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", str(self._log_path),
        ]  # fmt: skip

    def _readiness(self) -> contextlib.AbstractContextManager[Callable[[], bool]]:
        """PING answers +PONG."""
        return contextlib.nullcontext(lambda: _ping(self.port))


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started RedisServer, stopped when the block ends."""
    with RedisServer(directory).started() as server:
        yield server

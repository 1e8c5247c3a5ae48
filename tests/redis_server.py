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
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

_START_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 5


def redis_server_path() -> str | None:
    """The redis-server binary ($REDIS_SERVER, then PATH, then Debian's), or None."""
    candidates = [os.environ.get("REDIS_SERVER"), shutil.which("redis-server")]
    candidates.append("/usr/bin/redis-server")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process bound to 127.0.0.1 on `port`, files under `directory`."""

    def __init__(self, directory: Path, *, executable: str | None = None) -> None:
        self.directory = directory
        self.executable = executable or redis_server_path() or "redis-server"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> RedisServer:
        """Start on a free port (a new one unless restarting); retried if another process takes
        the port between choosing and binding it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        keep_port = self.port
        for _ in range(_PORT_ATTEMPTS):
            self.port = keep_port or _free_port()
            if self._launch():
                return self
        raise RuntimeError(
            f"redis-server did not start on 127.0.0.1:{self.port}; see {self._log_path}"
        )

    @property
    def _log_path(self) -> Path:
        return self.directory / "redis.log"

    def _launch(self) -> bool:
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", str(self._log_path),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # exited: most likely the port was taken
            if _ping(self.port):
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate the server and wait for it (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self._paused:
            proc.send_signal(signal.SIGCONT)
            self._paused = False
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost host: no shutdown, open connections reset."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze the process: connections stay open but nothing is answered (a slow server)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def restart(self) -> None:
        """Start again on the same port (after kill() or stop()), empty."""
        self.stop()
        self.start()


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started RedisServer, stopped when the block ends."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()

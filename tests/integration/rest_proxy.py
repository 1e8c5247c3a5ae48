"""The REST proxy served by uvicorn on a free loopback port, for the REST integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import uvicorn

from router.rest import create_app

MAX_BODY = 4096


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: pytest owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_proxy(target: str, local: Mapping[str, Any] | None = None) -> AsyncIterator[str]:
    """The proxy in front of the router at `target`; yields its base URL. With `local` (the
    router's local_handlers), the OpenAI routes call the router in process, as
    `serve --http-port` does."""
    app = create_app(target, timeout_s=60, max_body_bytes=MAX_BODY, local=local)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = QuietServer(uvicorn.Config(app, lifespan="on", log_level="warning", ws="none"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "the proxy failed to start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()

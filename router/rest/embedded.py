"""`irouter serve --http-port`: the REST proxy in the router's own process and event loop. Its
OpenAI routes call the router's InferenceService handlers directly (router.rest.local_client:
the same guard chain, deadline, statuses and metrics as a gRPC call, without the loopback hop);
the transcoded routes call the gRPC port over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from router import logs
from router.config import RouterConfig
from router.rest.app import create_app
from router.server import RouterServer, freeze_when_ready, thaw

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: SIGTERM stops the proxy, then the router."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def check(config: RouterConfig, http_port: int) -> None:
    """ValueError naming what cannot work with an in-process proxy."""
    if not 0 < http_port < 65536:
        raise ValueError(f"--http-port={http_port} must be a port in 1..65535 (0 turns it off)")
    if config.server.workers > 1:
        raise ValueError(
            f"--http-port serves from one process, not {config.server.workers} workers; "
            "run `irouter proxy --target HOST:PORT` beside them instead"
        )
    if config.server.tls.enabled:
        raise ValueError(
            "--http-port calls the gRPC port in plaintext, but server.tls is enabled; "
            "run `irouter proxy` with a TLS-terminating front instead"
        )


def loopback(host: str) -> str:
    """Where this process reaches its own gRPC port bound on `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve_with_proxy(config: RouterConfig, http_port: int) -> None:
    """Run the router and the proxy until SIGTERM/SIGINT; then the proxy stops taking requests
    and lets streams finish (within grace_seconds) before the router shuts down."""
    s = config.server
    router = RouterServer(config)
    grpc_port = await router.start()
    frozen = asyncio.ensure_future(freeze_when_ready(router))
    # The OpenAI routes call the router's handlers in this process; the others its gRPC port.
    app = create_app(f"{loopback(s.host)}:{grpc_port}", local=router.local_handlers)
    proxy = _Server(
        uvicorn.Config(
            app,
            host=s.host,
            port=http_port,
            lifespan="on",
            log_level=s.log_level.lower(),
            access_log=False,  # the router's metrics and audit log record every call
            # No X-Forwarded-* rewriting: nothing here reads the client's address, and the
            # middleware is one more layer on every request.
            proxy_headers=False,
            ws="none",
            http="httptools",
            timeout_graceful_shutdown=max(int(s.grace_seconds), 1),
        )
    )
    serving = asyncio.ensure_future(proxy.serve())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not proxy.started and not serving.done():
            await asyncio.sleep(0.05)
        if proxy.started:
            logger.info("REST proxy on http://%s:%d (API page: /docs)", s.host, http_port)
        await asyncio.wait((serving, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            logger.error("the REST proxy on %s:%d stopped on its own", s.host, http_port)
    finally:
        stopping.cancel()
        frozen.cancel()
        proxy.should_exit = True
        await serving
        logger.info("shutting down: in-flight calls get %.1fs", s.grace_seconds)
        await router.stop()
        thaw()


def run_with_proxy(config: RouterConfig, http_port: int) -> int:
    """`irouter serve --http-port`; returns the exit status."""
    import sys

    import uvloop

    try:
        check(config, http_port)
    except ValueError as exc:
        print(f"irouter serve: {exc}", file=sys.stderr)
        return 2
    # As `serve` alone: libraries at their own level (httpx logs every upstream call at INFO).
    logs.configure(
        config.server.log_level,
        config.server.library_log_level,
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvloop.run(serve_with_proxy(config, http_port))
    return 0

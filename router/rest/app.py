"""The REST proxy application: OpenAI-compatible routes in front of a router's gRPC port."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from router.rest.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    server_error_handler,
)
from router.rest.grpc_client import ClientDisconnected, RouterClient
from router.rest.openai_routes import Limits, OpenAIRoutes

logger = logging.getLogger(__name__)


async def _disconnected_handler(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


def create_app(
    target: str, *, timeout_s: float = 600, max_body_bytes: int = 1_048_576
) -> Starlette:
    """The proxy as an ASGI app calling the router at `target` ("host:port") over one channel,
    opened at startup and closed at shutdown; `timeout_s` is every call's deadline."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive")
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be positive")
    client = RouterClient(target, timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await client.start()
        logger.info("REST proxy calling the router at %s", target)
        try:
            yield
        finally:
            await client.aclose()

    routes = OpenAIRoutes(client, Limits(max_body_bytes=max_body_bytes))
    return Starlette(
        routes=routes.routes(),
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            ClientDisconnected: _disconnected_handler,
            Exception: server_error_handler,
        },
    )


async def serve_proxy(
    host: str,
    port: int,
    target: str,
    *,
    timeout_s: float = 600,
    max_body_bytes: int = 1_048_576,
    log_level: str = "info",
) -> None:
    """Serve the proxy with uvicorn until it is stopped (SIGINT/SIGTERM)."""
    app = create_app(target, timeout_s=timeout_s, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        ws="none",
        timeout_graceful_shutdown=30,
    )
    await uvicorn.Server(config).serve()

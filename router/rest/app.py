"""The REST proxy application in front of a router's gRPC port: the OpenAI-compatible routes,
every RPC transcoded from its google.api.http rule, /openapi.json and /docs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from router.proto.irouter.v1 import (
    deployment_service_pb2,
    inference_service_pb2,
    model_service_pb2,
    resource_service_pb2,
    retrieval_service_pb2,
    usage_service_pb2,
)
from router.rest.dispatch import Dispatch
from router.rest.docs import docs_routes
from router.rest.errors import ApiError, api_error_handler, http_error, server_error
from router.rest.grpc_client import ClientDisconnected, RouterClient
from router.rest.local_client import LocalRouterClient
from router.rest.openai_routes import Limits, OpenAIRoutes
from router.rest.openapi import openapi_document
from router.rest.status import StatusError, from_api_error
from router.rest.transcode import Transcoder

Handler = Callable[[Request, Exception], Awaitable[Response]]

SERVICES = (
    inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    retrieval_service_pb2.DESCRIPTOR.services_by_name["RetrievalService"],
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    deployment_service_pb2.DESCRIPTOR.services_by_name["DeploymentService"],
    resource_service_pb2.DESCRIPTOR.services_by_name["ResourceService"],
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
)

logger = logging.getLogger(__name__)


async def _status_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StatusError)
    return exc.response()


async def _disconnected_handler(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


def _by_path(transcoder: Transcoder, to_error: Callable[[Request, Exception], ApiError]) -> Handler:
    """Errors under the transcoded routes' prefixes as google.rpc.Status, others in OpenAI's
    shape."""

    async def handler(request: Request, exc: Exception) -> Response:
        error = to_error(request, exc)
        if transcoder.owns(request.url.path):
            return from_api_error(error).response()
        return error.response()

    return handler


def create_app(
    target: str,
    *,
    timeout_s: float = 600,
    max_body_bytes: int = 1_048_576,
    local: Mapping[str, Any] | None = None,
) -> Dispatch:
    """The proxy as an ASGI app calling the router at `target` ("host:port") over one channel,
    opened at startup and closed at shutdown; `timeout_s` is every call's deadline. With
    `local` (the router's InferenceService handlers, in this process: RouterServer's
    local_handlers), the OpenAI routes call them directly instead (router.rest.local_client).
    The OpenAI routes' fixed paths skip Starlette's routing (router.rest.dispatch)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive")
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be positive")
    client = RouterClient(target, timeout_s)
    calls: RouterClient | LocalRouterClient = client
    if local is not None:
        calls = LocalRouterClient(local, timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await client.start()
        logger.info("REST proxy calling the router at %s", target)
        try:
            yield
        finally:
            await client.aclose()

    openai = OpenAIRoutes(calls, Limits(max_body_bytes=max_body_bytes))
    transcoder = Transcoder(client, SERVICES, max_body_bytes)
    document = openapi_document(transcoder.bindings)
    handlers: dict[Any, Handler] = {
        ApiError: api_error_handler,
        StatusError: _status_handler,
        HTTPException: _by_path(transcoder, http_error),
        ClientDisconnected: _disconnected_handler,
        Exception: _by_path(transcoder, server_error),
    }
    app = Starlette(
        routes=[*openai.routes(), *transcoder.routes(), *docs_routes(document)],
        lifespan=lifespan,
        exception_handlers=handlers,
    )
    return Dispatch(app, openai.routes(), handlers)


async def serve_proxy(
    host: str,
    port: int,
    target: str,
    *,
    timeout_s: float = 600,
    max_body_bytes: int = 1_048_576,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve the proxy with uvicorn until it is stopped (SIGINT/SIGTERM)."""
    app = create_app(target, timeout_s=timeout_s, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        # One log line per request costs ~0.1 ms of the proxy's ~1 ms; the router's metrics and
        # audit log already record every call. --access-log turns it on.
        access_log=access_log,
        ws="none",
        http="httptools",  # C parser: h11 (pure Python) costs ~0.3 ms more per request
        timeout_graceful_shutdown=30,
    )
    await uvicorn.Server(config).serve()

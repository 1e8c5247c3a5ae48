"""The proxy's ASGI entry: requests for a fixed path of the OpenAI routes go straight to their
handler, every other request through the Starlette app (its router, middleware and handlers).

Why: Starlette's middleware layers and route matching (each route's pattern tried in turn) cost
~30-40 µs of a gateway call's ~0.7 ms of CPU here (loadtest/benchmarks/gateway_bench.py), on
every call of the routes that carry the traffic. Errors take the same exception handlers, looked
up the way Starlette does (the exception's class, then its bases); an error raised after the
answer started goes to the server, as Starlette lets it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class Dispatch:
    """ASGI app: `routes`' fixed paths to their endpoints, the rest to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Iterable[BaseRoute],
        handlers: Mapping[type[Exception], ErrorHandler],
    ) -> None:
        self.app = app
        """What serves every other request (and the lifespan)."""
        self._handlers = dict(handlers)
        self._direct: dict[tuple[str, str], Endpoint] = {}
        for route in routes:
            if isinstance(route, Route) and not route.param_convertors and route.methods:
                for method in route.methods:
                    self._direct[method, route.path] = route.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self._direct.get((scope["method"], scope["path"]))
            if endpoint is not None:
                scope["app"] = self.app
                request = Request(scope, receive, send)
                try:
                    response = await endpoint(request)
                except Exception as exc:
                    response = await self._handle(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _handle(self, request: Request, exc: Exception) -> Response:
        for kind in type(exc).__mro__:
            handler = self._handlers.get(kind)
            if handler is not None:
                return await handler(request, exc)
        raise exc

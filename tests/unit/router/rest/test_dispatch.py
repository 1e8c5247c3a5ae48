"""The proxy's entry: fixed paths straight to their endpoints, with Starlette's error handling;
everything else through the Starlette app."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from router.rest.dispatch import Dispatch


class Refused(Exception):
    pass


async def ok(request: Request) -> Response:
    return PlainTextResponse(f"ok {request.method} {await request.body()!r}")


async def refused(request: Request) -> Response:
    raise Refused("no")


async def broken(request: Request) -> Response:
    raise KeyError("bug")


async def item(request: Request) -> Response:
    return PlainTextResponse(f"item {request.path_params['name']}")


async def on_refused(request: Request, exc: Exception) -> Response:
    return JSONResponse({"refused": str(exc)}, status_code=400)


async def on_anything(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": type(exc).__name__}, status_code=500)


async def test_fixed_paths_go_direct_with_the_same_error_handling() -> None:
    direct = [
        Route("/v1/ok", ok, methods=["POST"]),
        Route("/v1/refused", refused, methods=["POST"]),
        Route("/v1/broken", broken, methods=["POST"]),
        Route("/v1/items/{name}", item, methods=["GET"]),  # a pattern: left to Starlette
    ]
    handlers = {Refused: on_refused, Exception: on_anything}
    starlette = Starlette(routes=direct, exception_handlers=handlers)
    app = Dispatch(starlette, direct, handlers)
    assert ("POST", "/v1/ok") in app._direct and len(app._direct) == 3
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/v1/ok", content=b"hi")
        assert (r.status_code, r.text) == (200, "ok POST b'hi'")
        r = await client.post("/v1/refused")
        assert (r.status_code, r.json()) == (400, {"refused": "no"})
        r = await client.post("/v1/broken")  # the handler of a base class, as Starlette's
        assert (r.status_code, r.json()) == (500, {"error": "KeyError"})
        assert (await client.get("/v1/ok")).status_code == 405  # Starlette's answer
        assert (await client.get("/v1/items/a")).text == "item a"
        assert (await client.get("/nowhere")).status_code == 404

"""/openapi.json and an offline API page at /docs: Swagger UI's assets come from the
swagger-ui-bundle-v2 package and are served by the proxy itself (no CDN)."""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

logger = logging.getLogger(__name__)

# Relative URLs, so that the page also works behind a path prefix.
_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>irouter API</title>
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true});
  </script>
</body>
</html>
"""


def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's assets in the installed package, or None without it."""
    try:
        vendor = Path(str(importlib.resources.files("swagger_ui_bundle"))) / "vendor"
    except ModuleNotFoundError:
        return None
    found = sorted(vendor.glob("swagger-ui-*/swagger-ui-bundle.js"))
    return found[-1].parent if found else None


def docs_routes(document: dict[str, Any]) -> list[BaseRoute]:
    """GET /openapi.json, GET /docs and the page's assets under /docs/assets."""

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document)

    assets = swagger_ui_dir()

    async def page(request: Request) -> Response:
        if assets is None:
            return HTMLResponse(
                "<p>Swagger UI is not installed (pip install swagger-ui-bundle-v2); "
                '<a href="openapi.json">openapi.json</a> is.</p>',
                status_code=503,
            )
        return HTMLResponse(_PAGE)

    routes: list[BaseRoute] = [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", page, methods=["GET"]),
    ]
    if assets is not None:
        routes.append(Mount("/docs/assets", app=StaticFiles(directory=assets), name="docs"))
    else:
        logger.warning("swagger-ui-bundle-v2 is not installed: /docs shows a placeholder")
    return routes

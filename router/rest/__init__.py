"""REST face of the router: OpenAI-compatible routes, every RPC transcoded from its
google.api.http rule, /openapi.json and /docs."""

from __future__ import annotations

from router.rest.app import create_app, serve_proxy

__all__ = ["create_app", "serve_proxy"]

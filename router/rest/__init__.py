"""REST face of the router: OpenAI-compatible routes over the gRPC InferenceService."""

from __future__ import annotations

from router.rest.app import create_app, serve_proxy

__all__ = ["create_app", "serve_proxy"]

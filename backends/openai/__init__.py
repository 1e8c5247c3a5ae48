"""A remote OpenAI-compatible HTTP server as engines: config, wire format, SSE, engines."""

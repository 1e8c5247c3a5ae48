"""Reading a request body under a size limit (413 past it), shared by every route."""

from __future__ import annotations

from starlette.requests import Request

from router.rest.errors import ApiError


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body; 413 past `max_bytes`, checked before reading when the client sends
    Content-Length and again while reading (a chunked body declares none)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"the request body ({size} bytes or more) exceeds the limit of {max_bytes} bytes",
        code="request_too_large",
    )

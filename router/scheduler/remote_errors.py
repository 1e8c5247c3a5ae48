"""A remote server's failure as the router's status: the one mapping for remote engines and
remote embedding models."""

from __future__ import annotations

from backends.remote import RemoteError, RemoteHTTPError, RemoteStatusError, RemoteTimeout
from router.errors import (
    UPSTREAM_STATUS,
    DeadlineExceeded,
    InvalidArgument,
    RouterError,
    Unavailable,
)


def remote_error(model: str, exc: RemoteError) -> RouterError:
    """DEADLINE_EXCEEDED for a timeout, INVALID_ARGUMENT when the server refused the request
    itself (an HTTP 4xx or a gRPC INVALID_ARGUMENT that another server would answer alike),
    UNAVAILABLE otherwise."""
    if isinstance(exc, RemoteTimeout):
        return DeadlineExceeded(f"model {model!r}: {exc}")
    if isinstance(exc, RemoteHTTPError) and 400 <= exc.status < 500 and not exc.retryable:
        error = InvalidArgument(f"model {model!r} refused the request: {exc}")
        error.reason = UPSTREAM_STATUS  # the REST proxy answers with the server's own status
        error.metadata = {"http_status": str(exc.status), "upstream": exc.url}
        return error
    if isinstance(exc, RemoteStatusError) and exc.request_fault:
        return InvalidArgument(f"model {model!r} refused the request: {exc}")
    return Unavailable(f"model {model!r}: {exc}")

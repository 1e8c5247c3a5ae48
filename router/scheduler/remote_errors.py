"""A remote server's failure as the router's status: the one mapping for remote engines and
remote embedding models."""

from __future__ import annotations

from backends.remote import RemoteError, RemoteHTTPError, RemoteStatusError, RemoteTimeout
from router.errors import DeadlineExceeded, InvalidArgument, RouterError, Unavailable


def remote_error(model: str, exc: RemoteError) -> RouterError:
    """DEADLINE_EXCEEDED for a timeout, INVALID_ARGUMENT when the server refused the request
    itself (an HTTP 4xx or a gRPC INVALID_ARGUMENT that another server would answer alike),
    UNAVAILABLE otherwise."""
    if isinstance(exc, RemoteTimeout):
        return DeadlineExceeded(f"model {model!r}: {exc}")
    if isinstance(exc, RemoteHTTPError) and 400 <= exc.status < 500 and not exc.retryable:
        return InvalidArgument(f"model {model!r} refused the request: {exc}")
    if isinstance(exc, RemoteStatusError) and exc.request_fault:
        return InvalidArgument(f"model {model!r} refused the request: {exc}")
    return Unavailable(f"model {model!r}: {exc}")

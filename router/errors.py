"""The router's error hierarchy. Each class carries its gRPC status code; `to_status` is the one
translation to a gRPC status (with google.rpc details: BadRequest, QuotaFailure, RetryInfo), and
`abort` the one way a call ends with it. Messages quote client values with `quote` and are cut
to MAX_MESSAGE_BYTES on the way out."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

MAX_MESSAGE_BYTES = 1024
"""Longest status message sent, in UTF-8 bytes. The message travels in a header (percent-encoded,
up to 3 bytes per byte) and again in a BadRequest detail; grpc clients refuse a header block
over their 8-16 KiB limit, so an unbounded message turns any error into RESOURCE_EXHAUSTED."""
QUOTE_CHARS = 96
"""Characters of a client's value that an error message quotes (`quote`)."""


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """A client's value as an error message quotes it: repr(), of at most `limit` characters
    (a longer value is cut and its length given), so that no input is echoed unbounded."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _bounded(message: str) -> str:
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    kept = data[: MAX_MESSAGE_BYTES - 80].decode("utf-8", "ignore")
    return f"{kept}... (message cut to {len(kept)} of {len(message)} characters)"


ERROR_DOMAIN = "irouter.dev"
"""google.rpc.ErrorInfo.domain of the router's errors."""
UPSTREAM_STATUS = "UPSTREAM_HTTP_STATUS"
"""ErrorInfo reason: a remote server answered an HTTP error; metadata `http_status` and
`upstream` (its URL). The REST proxy answers a 4xx with that same status."""


class RouterError(Exception):
    """Base of every error a client may see. The message names what was wrong."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = ""
    """A google.rpc.ErrorInfo reason (with `metadata`), when the error carries one."""
    metadata: dict[str, str] | None = None


class InvalidArgument(RouterError):
    """A request field has a bad value; `field` names it for google.rpc.BadRequest."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class Unauthenticated(RouterError):
    """No credentials, or credentials that did not verify. The message names what was wrong and
    never echoes the token or key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RouterError):
    """The caller is known but lacks a scope (or tenant access) the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(RouterError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RouterError):
    """Creating something whose name is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(RouterError):
    """A change lost a race with another change to the same thing; read it again and retry."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(RouterError):
    """Load shed or quota hit. `retry_after_s` becomes a google.rpc.RetryInfo detail and each
    (subject, description) in `violations` a google.rpc.QuotaFailure violation."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float = 1.0,
        violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.violations = violations


class FailedPrecondition(RouterError):
    """The request is well formed but the router is not set up to serve it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(RouterError):
    """The router or a backend cannot serve now. With `retry_after_s`, clients are told when to
    come back (a google.rpc.RetryInfo detail)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RouterError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RouterError):
    code = grpc.StatusCode.CANCELLED


class Internal(RouterError):
    code = grpc.StatusCode.INTERNAL


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    seconds = max(seconds, 0.0)
    delay = duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def to_status(error: RouterError) -> grpc.Status:
    """The single translation of router errors to gRPC statuses with google.rpc details."""
    details: list[any_pb2.Any] = []

    def add(detail: message.Message) -> None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)

    text = _bounded(str(error))
    if isinstance(error, InvalidArgument) and error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=_bounded(error.field), description=text
        )
        add(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(error, ResourceExhausted):
        add(_retry_info(error.retry_after_s))
        if error.violations:
            add(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in error.violations
                    ]
                )
            )
    elif isinstance(error, Unavailable) and error.retry_after_s is not None:
        add(_retry_info(error.retry_after_s))
    if error.reason:
        add(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata or {}
            )
        )
    status = status_pb2.Status(code=error.code.value[0], message=text, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: RouterError) -> None:
    """End the call with the error's status (the one way a handler answers one)."""
    await context.abort_with_status(to_status(error))

"""The router's error hierarchy. Each class carries its gRPC status code; `router.services.rpc`
translates them to a status in exactly one place."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """Base of every error a client may see. The message names what was wrong."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


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

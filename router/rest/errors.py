"""Errors in OpenAI's JSON shape, and the one mapping from gRPC statuses to HTTP codes."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router.errors import ERROR_DOMAIN, UPSTREAM_STATUS

logger = logging.getLogger(__name__)

# (HTTP status, OpenAI error type) per gRPC status; anything else is a 500 server_error.
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# The other way, for errors the proxy raises itself with an HTTP code (first gRPC code wins).
_CODES: dict[int, grpc.StatusCode] = {
    **{status: code for code, (status, _) in reversed(_HTTP.items())},
    405: grpc.StatusCode.UNIMPLEMENTED,
    406: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

_HTTP_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


@dataclass
class ApiError(Exception):
    """An error the client sees as `{"error": {...}}` with `status` as the HTTP code."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def type_error(name: str, expected: str, value: object) -> ApiError:
    """A 400 for body field `name` holding the wrong kind of value."""
    return bad_request(
        f"'{name}' must be {expected}, got {json.dumps(value)[:80]}",
        param=name,
        code="invalid_type",
    )


def refuse_unknown(where: str, fields: Mapping[str, Any], known: frozenset[str]) -> None:
    """A 400 naming the first key of the object at `where` that is not in `known`."""
    for key in sorted(set(fields) - known):
        raise bad_request(
            f"unrecognized argument '{where}.{key}'",
            param=f"{where}.{key}",
            code="unknown_parameter",
        )


_TOOL_FIELD = re.compile(r"tools\[(\d+)\]\.(\w+)")
_PARTS_FIELD = re.compile(r"\.parts\b")


def openai_param(field: str) -> str:
    """A router field (google.rpc.BadRequest) as OpenAI names it in a body."""
    param = field.removeprefix("sampling.")  # OpenAI names sampling fields at the top level
    if param.startswith("structured_output"):
        return "response_format"  # the one OpenAI field that sets it
    if param.startswith("tool_choice"):
        return "tool_choice"
    param = param.removeprefix("chat.")  # chat.messages[i]... is messages[i]...
    param = _PARTS_FIELD.sub(".content", param)  # a message's parts are its content
    return _TOOL_FIELD.sub(r"tools[\1].function.\2", param)


def error_from_status(
    code: grpc.StatusCode, message: str, details: Iterable[any_pb2.Any] = ()
) -> ApiError:
    """The HTTP error for a gRPC status: code, OpenAI type, `param` from a BadRequest field
    violation and `Retry-After` (whole seconds, rounded up) from a RetryInfo detail."""
    status, kind = _HTTP.get(code, (500, "server_error"))
    param: str | None = None
    headers: dict[str, str] = {}
    for detail in details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            headers["Retry-After"] = str(max(math.ceil(delay), 0))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                param = openai_param(bad.field_violations[0].field)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            upstream = _upstream_status(info)
            if upstream is not None:  # a remote server's refusal keeps its own status
                status, kind = upstream, _UPSTREAM_TYPES.get(upstream, "invalid_request_error")
    if status == 500:
        # An internal status may carry internals in its message; the client gets the code only.
        logger.warning("router answered %s: %s", code.name, message)
        message = f"the router failed the request ({code.name})"
    return ApiError(status, message, kind, param, code.name.lower(), headers)


_UPSTREAM_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def _upstream_status(info: error_details_pb2.ErrorInfo) -> int | None:
    """The HTTP status a remote server refused a request with (4xx), from the router's
    ErrorInfo (router.errors.UPSTREAM_STATUS)."""
    if info.reason != UPSTREAM_STATUS or info.domain != ERROR_DOMAIN:
        return None
    try:
        status = int(info.metadata["http_status"])
    except (KeyError, ValueError):
        return None
    return status if 400 <= status < 500 else None


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC code that stands for an HTTP status (UNKNOWN for one without a counterpart)."""
    return _CODES.get(status, grpc.StatusCode.UNKNOWN)


def rpc_details(error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The google.rpc details a failed call carried ([] when they disagree with its status)."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that disagree with the call's code or message
        status = None
    return [] if status is None else list(status.details)


def error_from_rpc(error: grpc.aio.AioRpcError) -> ApiError:
    """`error_from_status` for a failed call, with the google.rpc details it carried."""
    return error_from_status(error.code(), error.details() or "", rpc_details(error))


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


def http_error(request: Request, exc: Exception) -> ApiError:
    """Starlette's own 404 and 405 (and any other HTTPException) as an ApiError."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = exc.detail
    kind = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
    return ApiError(exc.status_code, message, kind, headers=dict(exc.headers or {}))


def server_error(request: Request, exc: Exception) -> ApiError:
    """Last resort: log the trace, answer a 500 without it."""
    logger.exception(
        "unhandled error on %s %s (request id %s)",
        request.method,
        request.url.path,
        request.headers.get("x-request-id", "-"),
        exc_info=exc,
    )
    return ApiError(500, "internal error in the REST proxy", "server_error")

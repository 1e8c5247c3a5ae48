"""Errors of the transcoded routes as google.rpc.Status JSON: `{"code", "message", "details"}`
with the HTTP status taken from errors.py's one gRPC → HTTP mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2
from starlette.responses import JSONResponse

from router.rest.errors import ApiError, error_from_status, grpc_code, rpc_details


@dataclass
class StatusError(Exception):
    """An error the client sees as a google.rpc.Status JSON object, with `http_status`."""

    http_status: int
    code: grpc.StatusCode
    message: str
    details: list[any_pb2.Any] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code.value[0],
            "message": self.message,
            "details": [json_format.MessageToDict(d) for d in self.details],
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.http_status, headers=self.headers)


def bad_field(field_path: str, description: str, *, http_status: int = 400) -> StatusError:
    """INVALID_ARGUMENT naming the field, with a google.rpc.BadRequest field violation."""
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=field_path, description=description
    )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    message = f"{field_path}: {description}" if field_path else description
    return StatusError(http_status, grpc.StatusCode.INVALID_ARGUMENT, message, [detail])


def from_rpc(error: grpc.aio.AioRpcError) -> StatusError:
    """The router's own status, passed on with its details (those of a 500 are withheld, as
    errors.py withholds its message)."""
    details = rpc_details(error)
    mapped = error_from_status(error.code(), error.details() or "", details)
    shown = details if mapped.status != 500 else []
    return StatusError(mapped.status, error.code(), mapped.message, shown, mapped.headers)


def from_api_error(error: ApiError) -> StatusError:
    """An error raised by the shared proxy code (headers, body size, connection)."""
    return StatusError(error.status, grpc_code(error.status), error.message, [], error.headers)

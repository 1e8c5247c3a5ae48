"""What the router knows of every remote engine, whatever its protocol: how one fails (the
RemoteError family, each saying whether another replica may take the same request) and the
last chunk of a remote stream (RemoteChunk, with the server's own token counts).

The router maps these to statuses in one place (router/scheduler/remote_errors.py) and never
imports an engine's module for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from backends.base import GenerationChunk

FINISH_REASONS = frozenset({"stop", "length"})
"""Finish reasons a remote server may report, as the engines pass them on."""


class RemoteError(Exception):
    """A remote server failed a request; the message names the URL and what went wrong."""

    def __init__(self, url: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.retryable = retryable
        """True when nothing was generated yet and another replica may serve the request."""


class RemoteUnavailable(RemoteError):
    """The server could not be reached or dropped the connection (refused, reset, DNS)."""


class RemoteTimeout(RemoteError):
    """No connection within the connect timeout, or silence longer than the read timeout."""


class RemoteHTTPError(RemoteError):
    """The server answered with an error: an HTTP status >= 400, or an error event mid-stream."""

    def __init__(self, url: str, message: str, *, status: int, retryable: bool) -> None:
        super().__init__(url, message, retryable=retryable)
        self.status = status
        """The HTTP status, or the error event's code (500 when it gave none)."""


class RemoteProtocolError(RemoteError):
    """The answer is not an OpenAI completion stream or embedding list (bad SSE, JSON, fields)."""


REQUEST_FAULT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
"""Statuses that blame the request: the router answers INVALID_ARGUMENT, and no retry helps."""


class RemoteStatusError(RemoteError):
    """The server answered a gRPC status other than OK (UNAVAILABLE and DEADLINE_EXCEEDED are
    RemoteUnavailable and RemoteTimeout), or an error message inside a stream."""

    def __init__(self, url: str, message: str, *, code: grpc.StatusCode, retryable: bool) -> None:
        super().__init__(url, message, retryable=retryable)
        self.code = code
        """The status; UNKNOWN for an error message inside a ModelStreamInfer stream."""

    @property
    def request_fault(self) -> bool:
        """The server blamed the request (INVALID_ARGUMENT, OUT_OF_RANGE)."""
        return self.code in REQUEST_FAULT_CODES


@dataclass(frozen=True, slots=True)
class RemoteChunk(GenerationChunk):
    """The last chunk of a remote stream: a GenerationChunk plus the server's token counts,
    when the server reports usage (llama-cpp-python does not)."""

    prompt_tokens: int | None = None
    """Prompt tokens as the server counted them."""
    completion_tokens: int | None = None
    """Generated tokens as the server counted them."""

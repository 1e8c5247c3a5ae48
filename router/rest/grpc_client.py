"""The proxy's side of gRPC: one pooled channel, per-call metadata and deadline, and calls that
end when the HTTP client goes away."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from starlette.requests import Request

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.rest.errors import ApiError, bad_request, error_from_rpc

if TYPE_CHECKING:
    from router.proto.irouter.v1.inference_service_pb2_grpc import InferenceServiceAsyncStub

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Headers that pass through to gRPC metadata under the same (lower-case) name (x-session-id:
# a routed conversation stays on one replica).
_PASSED = ("authorization", "x-api-key", "x-request-id", "x-session-id")
# A client's own timeout, in seconds (the OpenAI SDKs send X-Stainless-Timeout); it can only
# shorten the proxy's deadline.
_TIMEOUT_HEADERS = ("x-request-timeout", "x-stainless-timeout")


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer; the gRPC call was cancelled."""


_WANTED = frozenset(name.encode() for name in (*_PASSED, *_TIMEOUT_HEADERS))


def wanted_headers(request: Request) -> dict[str, str]:
    """The headers a call takes from its request (first value of each), in one pass over the
    raw list: Starlette's Headers.get scans it once per name asked (~7 a call)."""
    found: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        if name in _WANTED:  # ASGI servers give names in lower case
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def call_metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Credentials and the request id, as gRPC metadata (printable ASCII only)."""
    out: list[tuple[str, str]] = []
    for name in _PASSED:
        value = headers.get(name)
        if value is None:
            continue
        if not value.isascii() or not value.isprintable():
            raise bad_request(f"header {name!r} must be printable ASCII", code="invalid_header")
        out.append((name, value))
    return tuple(out)


def session_id(user: str) -> str:
    """A metadata-safe session id for an end-user id: as is when it is short printable ASCII,
    else a digest of it (gRPC metadata values must be printable ASCII)."""
    if len(user) <= 128 and user.isascii() and user.isprintable():
        return user
    return hashlib.blake2b(user.encode(), digest_size=16).hexdigest()


def call_timeout(headers: Mapping[str, str], limit_s: float) -> float:
    """The deadline for one call: the proxy's limit, or the client's own timeout if shorter."""
    for name in _TIMEOUT_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            raise bad_request(
                f"header {name!r} must be a number of seconds, got {value!r}",
                code="invalid_header",
            ) from None
        if seconds > 0:
            return min(seconds, limit_s)
    return limit_s


class CallOptions:
    """What a call made for an HTTP request carries: the client's credentials and request id
    as metadata, and its deadline."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    def options(
        self, request: Request, session: str | None = None
    ) -> tuple[float, tuple[tuple[str, str], ...]]:
        """(timeout, metadata) for a call made on behalf of `request`; `session` (the OpenAI
        body's session key, openai_params.session_key) becomes the x-session-id the router
        routes a conversation by, unless the client sent that header itself."""
        headers = wanted_headers(request)
        metadata = call_metadata(headers)
        if session and "x-session-id" not in headers:
            metadata += (("x-session-id", session_id(session)),)
        return call_timeout(headers, self._timeout_s), metadata


class RouterClient(CallOptions):
    """A gRPC client of the router's InferenceService over one shared channel."""

    def __init__(self, target: str, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self._target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: InferenceServiceAsyncStub | None = None

    async def start(self) -> None:
        """Open the channel (inside the running loop; grpc.aio binds to it)."""
        self._channel = grpc.aio.insecure_channel(self._target)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The shared channel (503 before start() and after aclose())."""
        if self._channel is None:
            raise ApiError(503, "the REST proxy is not connected", "service_unavailable_error")
        return self._channel

    @property
    def stub(self) -> InferenceServiceAsyncStub:
        if self._stub is None:
            raise ApiError(503, "the REST proxy is not connected", "service_unavailable_error")
        return self._stub

    async def complete(
        self, request: Request, message: pb.CompleteRequest, session: str | None = None
    ) -> pb.CompleteResponse:
        timeout, metadata = self.options(request, session)
        call = self.stub.Complete(message, timeout=timeout, metadata=metadata)
        return await unary_call(request, call)

    async def embed(
        self, request: Request, message: pb.EmbedRequest, session: str | None = None
    ) -> pb.EmbedResponse:
        timeout, metadata = self.options(request, session)
        call = self.stub.Embed(message, timeout=timeout, metadata=metadata)
        return await unary_call(request, call)

    async def list_models(self, request: Request) -> pb.ListModelsResponse:
        timeout, metadata = self.options(request)
        call = self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=metadata)
        return await unary_call(request, call)

    def generate(
        self, request: Request, message: pb.GenerateRequest, session: str | None = None
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The streamed chunks; closing the iterator (as Starlette does when the client
        disconnects during a streamed response) cancels the call."""
        timeout, metadata = self.options(request, session)
        call = self.stub.Generate(message, timeout=timeout, metadata=metadata)
        return _chunks(call)


async def _chunks(
    call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse],
) -> AsyncGenerator[pb.GenerateResponse, None]:
    try:
        while True:
            chunk = await call.read()
            if chunk is grpc.aio.EOF:
                return
            assert isinstance(chunk, pb.GenerateResponse)
            yield chunk
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from None
    finally:
        call.cancel()  # a no-op once the call has ended


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects; call it only once the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unary_call(request: Request, call: grpc.aio.UnaryUnaryCall[Any, T]) -> T:
    """Await a unary gRPC call, cancelling it if the HTTP client disconnects first. One watcher
    task and the call awaited directly: `unless_disconnected`'s two tasks and asyncio.wait cost
    more than the rest of a cached answer's path through the proxy."""
    gone = False

    async def watch() -> None:
        nonlocal gone
        await disconnected(request)
        gone = True
        call.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await call
    except asyncio.CancelledError:
        if not gone:  # the handler itself was cancelled
            call.cancel()
            raise
        logger.info(
            "client disconnected; cancelled the call (request id %s)",
            request.headers.get("x-request-id", "-"),
        )
        raise ClientDisconnected from None
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from None
    finally:
        watcher.cancel()


async def unless_disconnected(request: Request, call: Awaitable[T]) -> T:
    """Await a unary call, cancelling it if the HTTP client disconnects first."""
    answer = asyncio.ensure_future(call)
    watch = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait((answer, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled
        answer.cancel()
        raise
    finally:
        watch.cancel()
    if not answer.done():
        answer.cancel()
        logger.info(
            "client disconnected; cancelled the call (request id %s)",
            request.headers.get("x-request-id", "-"),
        )
        raise ClientDisconnected
    try:
        return answer.result()
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from None

"""The OpenAI routes' calls made in the router's own process (`irouter serve --http-port`): the
InferenceService's handlers called directly, wrapped as gRPC runs them (router.services.rpc: the
guard chain, the deadline, errors as statuses, the method's metrics), with no loopback HTTP/2 hop
and no protobuf encoding in between. That hop was about a fifth of the router's CPU per call
as a gateway (gRPC's client and server halves and their poller thread, profiled with py-spy).

The proxy as its own process (`irouter proxy`) and the transcoded routes keep calling the gRPC
port (router.rest.grpc_client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

import grpc
from google.rpc import status_pb2
from starlette.requests import Request

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.rest.errors import ApiError, error_from_status
from router.rest.grpc_client import CallOptions, ClientDisconnected, disconnected

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
_DETAILS_KEY = "grpc-status-details-bin"

Unary = Callable[[Any, Any], Awaitable[Any]]
Streaming = Callable[[Any, Any], AsyncIterator[Any]]


class LocalStatus(Exception):
    """A handler ended its call with a status (what abort_with_status does over gRPC)."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status

    def api_error(self) -> ApiError:
        details = ()
        for key, value in self.status.trailing_metadata or ():
            if key == _DETAILS_KEY:
                details = tuple(status_pb2.Status.FromString(value).details)
        return error_from_status(self.status.code, self.status.details or "", details)


class LocalContext:
    """What the router's handlers use of grpc.aio.ServicerContext, for a call made here."""

    __slots__ = ("_deadline", "_metadata")

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline: float) -> None:
        self._metadata = metadata
        self._deadline = deadline

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no TLS in process (serve --http-port refuses server.tls)

    async def abort_with_status(self, status: grpc.Status) -> None:
        raise LocalStatus(status)


WATCH_AFTER_S = 0.05
"""A unary call still running after this long starts watching for its client going away."""


def _past(timeout_s: float) -> ApiError:
    return error_from_status(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the call ran past its deadline of {timeout_s:g} s",
    )


class LocalRouterClient(CallOptions):
    """RouterClient's calls of the OpenAI routes, made on the handlers of this process."""

    def __init__(self, handlers: Mapping[str, Unary | Streaming], timeout_s: float) -> None:
        super().__init__(timeout_s)
        self._complete = cast(Unary, handlers[f"{SERVICE}/Complete"])
        self._embed = cast(Unary, handlers[f"{SERVICE}/Embed"])
        self._list_models = cast(Unary, handlers[f"{SERVICE}/ListModels"])
        self._generate = cast(Streaming, handlers[f"{SERVICE}/Generate"])

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def complete(
        self, request: Request, message: pb.CompleteRequest, session: str | None = None
    ) -> pb.CompleteResponse:
        return cast(
            pb.CompleteResponse, await self._unary(request, self._complete, message, session)
        )

    async def embed(
        self, request: Request, message: pb.EmbedRequest, session: str | None = None
    ) -> pb.EmbedResponse:
        return cast(pb.EmbedResponse, await self._unary(request, self._embed, message, session))

    async def list_models(self, request: Request) -> pb.ListModelsResponse:
        answer = await self._unary(request, self._list_models, pb.ListModelsRequest(), None)
        return cast(pb.ListModelsResponse, answer)

    async def _unary(
        self, request: Request, handler: Unary, message: Any, session: str | None
    ) -> Any:
        """The handler's answer; the call is cancelled when its deadline passes, or when the
        HTTP client goes away: watched from WATCH_AFTER_S on (a watcher task per call was a
        measurable part of a fast call's cost, and a client gone within it wastes little)."""
        timeout, metadata = self.options(request, session)
        context = LocalContext(metadata, time.monotonic() + timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = asyncio.current_task()
        assert task is not None
        why = ""  # why this call was cancelled: "deadline" or "gone"
        watcher: asyncio.Task[None] | None = None

        def cancel(reason: str) -> None:
            nonlocal why
            why = reason
            task.cancel()

        async def watch() -> None:
            await disconnected(request)
            cancel("gone")

        def start_watching() -> None:
            nonlocal watcher
            watcher = loop.create_task(watch())

        timers = [loop.call_at(deadline, cancel, "deadline")]
        if timeout > WATCH_AFTER_S:
            timers.append(loop.call_later(WATCH_AFTER_S, start_watching))
        try:
            return await handler(message, context)
        except LocalStatus as exc:
            raise exc.api_error() from None
        except asyncio.CancelledError:
            if not why:  # the route itself was cancelled
                raise
            task.uncancel()
            if why == "deadline":
                raise _past(timeout) from None
            logger.info(
                "client disconnected; cancelled the call (request id %s)",
                request.headers.get("x-request-id", "-"),
            )
            raise ClientDisconnected from None
        finally:
            for timer in timers:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()

    def generate(
        self, request: Request, message: pb.GenerateRequest, session: str | None = None
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The streamed chunks; closing the iterator (as Starlette does when the client
        disconnects during a streamed response) cancels the call."""
        timeout, metadata = self.options(request, session)
        return self._chunks(message, timeout, metadata)

    async def _chunks(
        self, message: pb.GenerateRequest, timeout: float, metadata: tuple[tuple[str, str], ...]
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        context = LocalContext(metadata, time.monotonic() + timeout)
        responses = cast(
            AsyncGenerator[pb.GenerateResponse, None], self._generate(message, context)
        )
        # One timer for the whole stream (an asyncio.timeout per chunk cost ~7% of a streamed
        # call's CPU). It cancels the task waiting for the next chunk, if one is (the chunks
        # may be asked for by another task than the first one: Starlette streams from its
        # own), else the next wait ends at once.
        waiting: list[asyncio.Task[Any] | None] = [None]
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if waiting[0] is not None:
                waiting[0].cancel()

        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            while not expired:
                task = waiting[0] = asyncio.current_task()
                try:
                    chunk = await anext(responses)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not expired or task is None:
                        raise
                    task.uncancel()
                    break
                finally:
                    waiting[0] = None
                yield chunk
            raise _past(timeout)
        except LocalStatus as exc:
            raise exc.api_error() from None
        finally:
            timer.cancel()
            await responses.aclose()

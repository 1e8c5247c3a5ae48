"""Registering servicers: the guard chain around each call, safe request parsing, errors answered
as statuses (router.errors.abort), and per-method metrics. Shared by every service so none of
them handles these itself."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from router import offload
from router.errors import DeadlineExceeded, InvalidArgument, RouterError, abort
from router.guard.chain import CallScope, GuardChain
from router.telemetry import Metrics

logger = logging.getLogger(__name__)

Unary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


class Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can answer
    INVALID_ARGUMENT instead of grpc's generic INTERNAL 'Exception deserializing request!'."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


OFF_LOOP_BYTES = 256 * 1024
"""Requests bigger than this are parsed on the worker thread (router.offload), not by grpc on
the loop: a 3.9 MB prompt takes ~2.5 ms to parse, and sixteen arriving together held every other
call behind ~40 ms of parsing."""


class Unparsed:
    """A request too big to parse on the loop: its bytes, parsed by the call's wrapper on the
    worker thread."""

    __slots__ = ("data", "parse")

    def __init__(self, data: bytes, parse: Callable[[bytes], message.Message | Malformed]):
        self.data = data
        self.parse = parse

    async def parsed(self) -> message.Message | Malformed:
        return await offload.run(lambda: self.parse(self.data))


def _parser(
    cls: type[message.Message],
) -> Callable[[bytes], message.Message | Malformed | Unparsed]:
    name = cls.DESCRIPTOR.full_name

    def parse_now(data: bytes) -> message.Message | Malformed:
        try:
            return cls.FromString(data)
        except message.DecodeError as exc:  # also raised for strings that are not UTF-8
            return Malformed(f"the request is not a valid {name} message: {exc}")

    def parse(data: bytes) -> message.Message | Malformed | Unparsed:
        if len(data) > OFF_LOOP_BYTES:
            return Unparsed(data, parse_now)
        return parse_now(data)

    return parse


class _Method:
    """What every call of one method goes through, unary or streamed: the guard chain (when
    one is configured and the method is not public), request parsing, the server's default
    deadline, errors answered as statuses, and the method's metrics. One wrapper per call, so a
    streamed response passes through one generator layer, not one per concern."""

    __slots__ = ("_children", "_guard", "_latency", "_metrics", "_name", "_path", "precheck")

    def __init__(
        self,
        metrics: Metrics,
        service: ServiceDescriptor,
        method: str,
        guard: GuardChain | None,
        precheck: Callable[[bytes], None] | None = None,
    ) -> None:
        self.precheck = precheck
        """Looks at a big request's bytes before they are parsed (raises RouterError to refuse
        it): the servicer's `check_<method>_bytes`, when it has one."""
        self._metrics = metrics
        self._name = f"{service.name}/{method}"  # the metrics' label
        self._path = f"/{service.full_name}/{method}"  # what the guard and its audit see
        self._guard = None if guard is None or guard.public(self._path) else guard
        self._latency = metrics.latency.labels(self._name)
        self._children: dict[str, Any] = {}

    def open(self, context: grpc.aio.ServicerContext[Any, Any]) -> CallScope | None:
        return None if self._guard is None else self._guard.open(self._path, context)

    async def enter(
        self, scope: CallScope, context: grpc.aio.ServicerContext[Any, Any]
    ) -> float | None:
        """The guard links (which may refuse the call); the seconds the call may run (the
        server's default deadline) or None."""
        assert self._guard is not None
        await self._guard.enter(scope)
        return self._guard.deadline(context)

    async def leave(self, scope: CallScope, code: str) -> None:
        assert self._guard is not None
        await self._guard.leave(scope, code)

    def done(self, code: str, started: float) -> None:
        child = self._children.get(code)
        if child is None:
            child = self._children[code] = self._metrics.requests.labels(self._name, code)
        child.inc()
        self._latency.observe(time.perf_counter() - started)


def _past_default(timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the call ran past the server's default deadline of {timeout:g} s; "
        "set a deadline on the call to choose your own"
    )


def _wrap_unary(fn: Unary, m: _Method) -> Unary:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        scope = m.open(context)
        code = "OK"
        try:
            # Without a guard (scope None) no coroutine is made for it: this is every call.
            timeout = None if scope is None else await m.enter(scope, context)
            if type(request) is Unparsed:
                if m.precheck is not None:
                    m.precheck(request.data)  # may refuse it before it is parsed
                request = await request.parsed()
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            if timeout is None:
                return await fn(request, context)
            try:
                async with asyncio.timeout(timeout):
                    return await fn(request, context)
            except TimeoutError:
                raise _past_default(timeout) from None
        except RouterError as error:
            code = error.code.name
            await abort(context, error)
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            if scope is not None:
                await m.leave(scope, code)
            m.done(code, started)

    return handler


def _wrap_stream(fn: Streaming, m: _Method) -> Streaming:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        scope = m.open(context)
        code = "OK"
        try:
            # Without a guard (scope None) no coroutine is made for it: this is every call.
            timeout = None if scope is None else await m.enter(scope, context)
            if type(request) is Unparsed:
                if m.precheck is not None:
                    m.precheck(request.data)  # may refuse it before it is parsed
                request = await request.parsed()
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            try:
                async with asyncio.timeout(timeout):
                    async for response in fn(request, context):
                        yield response
            except TimeoutError:
                if timeout is None:
                    raise
                raise _past_default(timeout) from None
        except RouterError as error:
            code = error.code.name
            await abort(context, error)
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            if scope is not None:
                await m.leave(scope, code)
            m.done(code, started)

    return handler


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # grpc cancels the handler both when the client cancels and when its deadline passes;
        # the client saw DEADLINE_EXCEEDED in the second case, and so do the metrics.
        left = context.time_remaining()
        return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):  # raised by abort() after the code was recorded
        return "ABORTED_BY_HANDLER"
    logger.exception("unhandled error in handler", exc_info=exc)
    return "INTERNAL"


def add_service(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    metrics: Metrics,
    guard: GuardChain | None = None,
) -> dict[str, Unary | Streaming]:
    """Register every method of `service` on `server`, implemented by `servicer`'s methods of
    the same names, each call run through `guard` unless the method is public. A request too big
    to parse on the loop is first given to `servicer.check_<method>_bytes(data)` if it exists.
    Returns the wrapped handlers by "<service>/<method>", for callers in this process
    (router.rest.local_client): the same guard, deadline, statuses and metrics as over gRPC."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    local: dict[str, Unary | Streaming] = {}
    for method in service.methods:
        fn = getattr(servicer, method.name)
        request_cls = GetMessageClass(method.input_type)
        precheck = getattr(servicer, f"check_{method.name}_bytes", None)
        mm = _Method(metrics, service, method.name, guard, precheck)
        parse = _parser(request_cls)
        serialize = _serializer
        if method.server_streaming:
            stream = local[f"{service.full_name}/{method.name}"] = _wrap_stream(fn, mm)
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=parse, response_serializer=serialize
            )
        else:
            unary = local[f"{service.full_name}/{method.name}"] = _wrap_unary(fn, mm)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=parse, response_serializer=serialize
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    return local


def _serializer(response: message.Message) -> bytes:
    return response.SerializeToString()

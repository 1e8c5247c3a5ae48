"""Registering servicers: safe request parsing, errors answered as statuses (router.errors.abort),
and per-method metrics. Shared by every service so none of them handles these itself."""

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

from router.errors import InvalidArgument, RouterError, abort
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


def _parser(cls: type[message.Message]) -> Callable[[bytes], message.Message | Malformed]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> message.Message | Malformed:
        try:
            return cls.FromString(data)
        except message.DecodeError as exc:  # also raised for strings that are not UTF-8
            return Malformed(f"the request is not a valid {name} message: {exc}")

    return parse


class _MethodMetrics:
    __slots__ = ("_children", "_latency", "_method", "_metrics")

    def __init__(self, metrics: Metrics, method: str) -> None:
        self._metrics = metrics
        self._method = method
        self._latency = metrics.latency.labels(method)
        self._children: dict[str, Any] = {}

    def done(self, code: str, started: float) -> None:
        child = self._children.get(code)
        if child is None:
            child = self._children[code] = self._metrics.requests.labels(self._method, code)
        child.inc()
        self._latency.observe(time.perf_counter() - started)


def _wrap_unary(fn: Unary, mm: _MethodMetrics) -> Unary:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        code = "OK"
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            return await fn(request, context)
        except RouterError as error:
            code = error.code.name
            await abort(context, error)
        except BaseException as exc:
            code = _code_of(exc)
            raise
        finally:
            mm.done(code, started)

    return handler


def _wrap_stream(fn: Streaming, mm: _MethodMetrics) -> Streaming:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        code = "OK"
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.reason)
            async for response in fn(request, context):
                yield response
        except RouterError as error:
            code = error.code.name
            await abort(context, error)
        except BaseException as exc:
            code = _code_of(exc)
            raise
        finally:
            mm.done(code, started)

    return handler


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):
        return "ABORTED_BY_HANDLER"
    logger.exception("unhandled error in handler", exc_info=exc)
    return "INTERNAL"


def add_service(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    metrics: Metrics,
) -> None:
    """Register every method of `service` on `server`, implemented by `servicer`'s methods of
    the same names."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        fn = getattr(servicer, method.name)
        request_cls = GetMessageClass(method.input_type)
        mm = _MethodMetrics(metrics, f"{service.name}/{method.name}")
        parse = _parser(request_cls)
        serialize = _serializer
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(fn, mm), request_deserializer=parse, response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(fn, mm), request_deserializer=parse, response_serializer=serialize
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _serializer(response: message.Message) -> bytes:
    return response.SerializeToString()

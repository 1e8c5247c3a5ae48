"""HTTP/JSON → gRPC transcoding driven by the `google.api.http` options of the services.

At startup every RPC's HttpRule (and its additional_bindings) becomes a route. A request message
is built from, in order: the JSON body (the whole request for `body: "*"`, one field for
`body: "field"`), the path variables (which must agree with the body when both set a field), and
for the other rules the query string (`?a.b=1&tags=x&tags=y`, proto or JSON names). The answer is
the response message in canonical JSON; errors are google.rpc.Status objects (status.py).

A server-streaming RPC answers newline-delimited JSON by default (`application/x-ndjson`: one
message per line, which any HTTP client can read line by line) or Server-Sent Events when the
client asks for `text/event-stream` (`data: {message}` per event). A failure after the first
message cannot change the status line: it arrives as a last line `{"error": {Status}}` (NDJSON) or
an `event: error` (SSE). The first message is awaited before answering, so a refused request still
gets its HTTP error code. A client that goes away cancels the gRPC call."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from router.rest import proto_json
from router.rest.body import read_body
from router.rest.errors import ApiError
from router.rest.grpc_client import RouterClient, unless_disconnected
from router.rest.http_rule import Binding, bindings
from router.rest.proto_json import FieldError
from router.rest.status import StatusError, bad_field, from_api_error, from_rpc

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Media ranges that accept the default stream format.
_ANY = ("*/*", "application/*", "application/json")


def stream_format(headers: Headers) -> str:
    """The stream format the Accept header prefers: NDJSON unless SSE ranks higher; a 406
    StatusError when it accepts neither."""
    accept = headers.get("accept", "").strip()
    if not accept:
        return NDJSON
    best: tuple[float, str] | None = None
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        fmt = SSE if media == SSE else NDJSON if media == NDJSON or media in _ANY else None
        if fmt is None or quality <= 0:
            continue
        # Higher quality wins; on a tie the range listed first does.
        if best is None or quality > best[0]:
            best = (quality, fmt)
    if best is None:
        raise StatusError(
            406,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"this streaming method answers {NDJSON} or {SSE}; the Accept header {accept!r} "
            "takes neither",
        )
    return best[1]


@dataclass(frozen=True)
class _Rpc:
    """What a call needs besides the request: the method's gRPC path and message classes."""

    binding: Binding
    path: str
    request_type: type[Message]
    response_type: type[Message]

    @classmethod
    def of(cls, binding: Binding) -> _Rpc:
        method: MethodDescriptor = binding.method
        return cls(
            binding,
            f"/{method.containing_service.full_name}/{method.name}",
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )


class Transcoder:
    """The transcoded routes of `services`, calling the router through `client`."""

    def __init__(
        self, client: RouterClient, services: Sequence[ServiceDescriptor], max_body_bytes: int
    ) -> None:
        self._client = client
        self._max_body_bytes = max_body_bytes
        self.bindings = [b for s in services for m in s.methods for b in bindings(m)]
        self._prefixes = {_first_segment(b.template.source) for b in self.bindings}

    def owns(self, path: str) -> bool:
        """Whether a path is under one of the transcoded routes' first segments (its errors are
        then google.rpc.Status objects rather than OpenAI's shape)."""
        return _first_segment(path) in self._prefixes

    def routes(self) -> list[BaseRoute]:
        """One route per path shape, answering each of its HTTP methods (405 for the others)."""
        shapes: dict[str, dict[str, _Rpc]] = {}
        for binding in self.bindings:
            by_method = shapes.setdefault(binding.template.shape, {})
            if binding.http_method in by_method:
                other = by_method[binding.http_method].binding
                raise ValueError(
                    f"{binding.rpc_name} and {other.rpc_name} both bind "
                    f"{binding.http_method} {binding.template.source}"
                )
            by_method[binding.http_method] = _Rpc.of(binding)
        # Starlette takes the first full match: templates with a custom verb and more literal
        # segments go first, so "/collections/x:search" is Search, not DescribeCollection.
        ordered = sorted(shapes.values(), key=lambda m: _specificity(next(iter(m.values()))))
        return [_RpcRoute(self._dispatch, methods) for methods in ordered]

    async def _dispatch(self, request: Request, rpc: _Rpc, path_values: dict[str, str]) -> Response:
        try:
            message = await self._message(request, rpc, path_values)
            if rpc.binding.method.server_streaming:
                return await self._stream(request, rpc, message)
            return await self._unary(request, rpc, message)
        except FieldError as exc:
            return bad_field(exc.field, exc.description).response()
        except StatusError as exc:
            return exc.response()
        except ApiError as exc:
            return from_api_error(exc).response()

    async def _message(self, request: Request, rpc: _Rpc, path_values: dict[str, str]) -> Message:
        binding = rpc.binding
        desc = binding.method.input_type
        message = rpc.request_type()
        if binding.body:
            raw = await read_body(request, self._max_body_bytes)
            value = _parse_json(raw) if raw.strip() else {}
            if binding.body == "*":
                proto_json.merge_json(value, message)
            else:
                proto_json.merge_json({binding.body: value}, message)
        for dotted, raw_value in path_values.items():
            chain = proto_json.resolve_path(desc, dotted)
            proto_json.set_from_strings(message, chain, [raw_value], dotted, conflict_check=True)
        query: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            query.setdefault(name, []).append(value)
        bound = {tuple(f.name for f in proto_json.resolve_path(desc, p)) for p in path_values}
        for name, values in sorted(query.items()):
            if binding.body == "*":
                raise FieldError(name, "this method reads every field from the JSON body")
            chain = proto_json.resolve_path(desc, name)
            names = tuple(f.name for f in chain)
            if names in bound:
                raise FieldError(name, "is set by the path")
            if binding.body and names[0] == binding.body:
                raise FieldError(name, f"belongs to the body ({binding.body})")
            proto_json.set_from_strings(message, chain, values, name)
        return message

    async def _unary(self, request: Request, rpc: _Rpc, message: Message) -> Response:
        timeout, metadata = self._client.options(request)
        call = self._client.channel.unary_unary(
            rpc.path,
            request_serializer=_serialize,
            response_deserializer=rpc.response_type.FromString,
        )(message, timeout=timeout, metadata=metadata)
        answer = await unless_disconnected(request, _statused(call))
        assert isinstance(answer, Message)
        return JSONResponse(_render(answer, rpc.binding.response_body))

    async def _stream(self, request: Request, rpc: _Rpc, message: Message) -> Response:
        fmt = stream_format(request.headers)
        timeout, metadata = self._client.options(request)
        call = self._client.channel.unary_stream(
            rpc.path,
            request_serializer=_serialize,
            response_deserializer=rpc.response_type.FromString,
        )(message, timeout=timeout, metadata=metadata)
        messages = _messages(call)
        try:
            first = await unless_disconnected(request, anext(messages, None))
        except BaseException:
            await messages.aclose()
            raise
        encode: Callable[[dict[str, Any]], bytes] = _sse if fmt == SSE else _ndjson
        encode_error = _sse_error if fmt == SSE else _ndjson_error
        response_body = rpc.binding.response_body

        async def body() -> AsyncIterator[bytes]:
            try:
                current = first
                while current is not None:
                    yield encode(_render(current, response_body))
                    current = await anext(messages, None)
            except StatusError as exc:
                yield encode_error(exc.body())
            finally:
                await messages.aclose()

        return StreamingResponse(body(), media_type=fmt, headers=_STREAM_HEADERS)


class _RpcRoute(BaseRoute):
    """The bindings of one path shape, by HTTP method. Matching runs on the raw path so that a
    percent-encoded "/" stays inside its variable."""

    def __init__(
        self,
        dispatch: Callable[[Request, _Rpc, dict[str, str]], Awaitable[Response]],
        methods: dict[str, _Rpc],
    ) -> None:
        self._dispatch = dispatch
        self._methods = methods
        self._allow = ", ".join(sorted(methods))

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.split(b"?", 1)[0].decode("latin-1")
        rpc = self._methods.get(scope["method"])
        if rpc is not None:
            values = rpc.binding.template.match(path)
            if values is not None:
                return Match.FULL, {"irouter.rpc": rpc, "irouter.path_values": values}
        if any(r.binding.template.match(path) is not None for r in self._methods.values()):
            return Match.PARTIAL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        rpc = scope.get("irouter.rpc")
        if rpc is None or scope["method"] not in self._methods:
            raise HTTPException(405, headers={"Allow": self._allow})
        request = Request(scope, receive)
        response = await self._dispatch(request, rpc, scope["irouter.path_values"])
        await response(scope, receive, send)


def _specificity(rpc: _Rpc) -> tuple[int, int, int]:
    template = rpc.binding.template
    literals = sum(1 for s in template.segments if isinstance(s, str) and "*" not in s)
    return (template.verb is None, -literals, -len(template.segments))


def _first_segment(path: str) -> str:
    return path.lstrip("/").split("/", 1)[0]


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise FieldError("body", f"not valid JSON: {exc}") from None


def _reject_constant(name: str) -> float:
    raise ValueError(f'{name} is not valid JSON (canonical JSON writes it as the string "{name}")')


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _render(message: Message, response_body: str) -> Any:
    rendered = proto_json.to_json(message)
    if not response_body:
        return rendered
    field = message.DESCRIPTOR.fields_by_name[response_body]
    return rendered.get(field.json_name)


async def _statused(call: Any) -> Message:
    try:
        answer = await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc) from None
    assert isinstance(answer, Message)
    return answer


async def _messages(call: Any) -> AsyncGenerator[Message, None]:
    try:
        while True:
            item = await call.read()
            if item is grpc.aio.EOF:
                return
            yield item
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc) from None
    finally:
        call.cancel()  # a no-op once the call has ended


def _ndjson(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


def _ndjson_error(status: dict[str, Any]) -> bytes:
    return _ndjson({"error": status})


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _sse_error(status: dict[str, Any]) -> bytes:
    return b"event: error\n" + _sse(status)

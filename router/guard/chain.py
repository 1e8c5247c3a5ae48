"""The guard chain: one grpc.aio interceptor that runs the enabled guard links in order around
every call, and the per-call `CallScope` services use for what only they can see.

Order (DESIGN.md): request id and deadline → authentication → authorization (method scope) →
rate limits → [the call] → audit. Links run inside one interceptor rather than one interceptor
each: every grpc interceptor wraps the handler again, and the per-call cost of the chain is what
the guard benchmark measures.

Token quotas, the tenant's model allowlist and the guardrails need the resolved model, the
tokenized prompt and the decoded stream, which exist only inside the service. The chain therefore
binds a `CallScope` in a context variable, and services call its hooks (`admit`, `check_input`,
`output_filter`, `record_usage`); with no guard configured the hooks cost a method call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import grpc

from router.errors import DeadlineExceeded, RouterError, abort
from router.guard.identity import Identity, current_identity

logger = logging.getLogger(__name__)

Metadata = dict[str, str]
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class InputFilter(Protocol):
    def check(self, text: str) -> str: ...


class StreamFilter(Protocol):
    def feed(self, delta: str) -> tuple[str, str | None]: ...

    def finish(self) -> tuple[str, str | None]: ...


@dataclass(eq=False)
class CallScope:
    """What the guard knows about one call; services call its hooks."""

    method: str
    request_id: str
    metadata: Metadata
    context: grpc.aio.ServicerContext[Any, Any] | None = None
    identity: Identity | None = None
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    findings: list[str] = field(default_factory=list)
    """Guardrail findings as 'policy:kind:action' (never the matched text), for the audit log."""
    # Hooks installed by the links that are enabled (None: nothing to do).
    admit_hooks: list[Callable[[CallScope, int, bool], Awaitable[None]]] = field(
        default_factory=list
    )
    model_hooks: list[Callable[[CallScope], None]] = field(default_factory=list)
    scope_hooks: list[Callable[[CallScope, str, str], None]] = field(default_factory=list)
    settle_hooks: list[Callable[[CallScope], Awaitable[None]]] = field(default_factory=list)
    input_filter: InputFilter | None = None
    output_filter_factory: Callable[[], StreamFilter] | None = None

    def use_model(self, model: str) -> None:
        """The service resolved the model: per-tenant model allowlists apply here."""
        self.model = model
        for hook in self.model_hooks:
            hook(self)

    def require(self, needed: str, why: str) -> None:
        """A request option (`why`) needs scope `needed` beyond the method's own."""
        for hook in self.scope_hooks:
            hook(self, needed, why)

    async def admit(self, *, prompt_tokens: int, reserve_tokens: int, stream: bool) -> None:
        """Before scheduling: charge the tenant's token quota (prompt + the most the call may
        generate); the unused part is refunded when the call ends."""
        self.prompt_tokens = prompt_tokens
        for hook in self.admit_hooks:
            await hook(self, reserve_tokens, stream)

    def check_input(self, text: str) -> str:
        """Input guardrails; returns the text to use (possibly redacted) or raises."""
        return text if self.input_filter is None else self.input_filter.check(text)

    def output_filter(self) -> StreamFilter | None:
        return None if self.output_filter_factory is None else self.output_filter_factory()

    def record_usage(self, completion_tokens: int) -> None:
        self.completion_tokens = completion_tokens


current_scope: ContextVar[CallScope | None] = ContextVar("irouter_call_scope", default=None)


def get_scope(method: str = "") -> CallScope:
    """The current call's scope; a neutral one when no guard chain runs (tests, no guard)."""
    scope = current_scope.get()
    if scope is None:
        scope = CallScope(method=method, request_id="", metadata={})
    return scope


class Link(Protocol):
    """One step of the chain. `before` may raise a RouterError to refuse the call."""

    name: str

    async def before(self, scope: CallScope) -> None: ...


class CallObserver(Protocol):
    def on_call_end(self, scope: CallScope, code: str) -> None: ...


_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}"


class RequestContextLink:
    """Request id: the client's `x-request-id` (so logs join across services), or a fresh one.
    The default deadline for calls that come without one is applied by the interceptor."""

    name = "context"

    async def before(self, scope: CallScope) -> None:
        given = scope.metadata.get("x-request-id", "")
        scope.request_id = given[:128] if given else f"req-{_PREFIX}-{next(_ids)}"


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        links: Sequence[Link],
        *,
        public: Callable[[str], bool],
        observer: CallObserver | None = None,
        default_timeout_s: float | None = None,
    ) -> None:
        self._links = tuple(links)
        self._public = public
        self._observer = observer
        self._timeout = default_timeout_s

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._public(method):
            return handler
        return cast("grpc.RpcMethodHandler[_Req, _Resp]", _wrap(handler, method, self))

    def open(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> CallScope:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        scope = CallScope(method=method, request_id="", metadata=metadata, context=context)
        current_scope.set(scope)
        return scope

    async def enter(self, scope: CallScope) -> None:
        """Run the links; a refused call still reaches leave(), so it is audited too."""
        for link in self._links:
            await link.before(scope)
        current_identity.set(scope.identity)

    async def leave(self, scope: CallScope, code: str) -> None:
        for hook in scope.settle_hooks:
            try:
                await hook(scope)
            except Exception:
                logger.exception("request %s: settling the call failed", scope.request_id)
        if self._observer is not None:
            self._observer.on_call_end(scope, code)

    def deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
        """Seconds the call may run: the server default when the client set no deadline."""
        if self._timeout is None or context.time_remaining() is not None:
            return None
        return self._timeout


def _code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if isinstance(exc, RouterError):
        return exc.code.name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if exc is None else "UNKNOWN"


@contextlib.asynccontextmanager
async def _guarded(
    chain: GuardInterceptor, method: str, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[None]:
    """Around one call: the links, the server's default deadline, the status translation of a
    refusal, and leave() (settling quotas, audit) whatever happened."""
    scope = chain.open(method, context)
    error: BaseException | None = None
    try:
        await chain.enter(scope)
        timeout = chain.deadline(context)
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            raise DeadlineExceeded(
                f"the call ran past the server's default deadline of {timeout:g} s; "
                "set a deadline on the call to choose your own"
            ) from None
    except RouterError as exc:
        error = exc
        await abort(context, exc)
    except BaseException as exc:
        error = exc
        raise
    finally:
        await chain.leave(scope, _code(context, error))


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, chain: GuardInterceptor
) -> grpc.RpcMethodHandler[Any, Any]:
    """Wrap the handler's behaviour, whichever of the four kinds it is (grpc's own examples
    do the same with one helper per kind)."""

    if handler.unary_unary is not None:
        inner_unary: Any = handler.unary_unary  # an async behaviour under grpc.aio

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with _guarded(chain, method, context):
                return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    if handler.unary_stream is not None:
        inner_stream: Any = handler.unary_stream  # an async generator under grpc.aio

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with _guarded(chain, method, context):
                async for response in inner_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # Client-streaming and bidi methods are not part of the API yet; refuse to run them unguarded.
    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} cannot be guarded")

    return grpc.unary_unary_rpc_method_handler(refuse)

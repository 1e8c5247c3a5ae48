"""The guard chain: the enabled guard links, run in order around every call, and the per-call
`CallScope` services use for what only they can see.

Order (DESIGN.md): request id and deadline → authentication → authorization (method scope) →
rate limits → [the call] → audit. The chain is not a grpc interceptor: an interceptor wraps the
handler again (one more coroutine per call, one more generator layer per streamed response),
so `router.services.rpc` runs the links in the same wrapper that parses requests and answers
errors, and the per-call cost of the chain is what the guard benchmark measures.

Token quotas, the tenant's model allowlist and the guardrails need the resolved model, the
tokenized prompt and the decoded stream, which exist only inside the service. The chain therefore
binds a `CallScope` in a context variable, and services call its hooks (`admit`, `check_input`,
`output_filter`, `record_usage`); with no guard configured the hooks cost a method call.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from router.guard.identity import Identity, current_identity

logger = logging.getLogger(__name__)

Metadata = dict[str, str]


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
    served_replica: str = ""
    """The deployment's replica whose attempt ran last (what usage bills a rollout by)."""
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
    The default deadline for calls that come without one is applied by the call wrapper
    (router.services.rpc)."""

    name = "context"

    async def before(self, scope: CallScope) -> None:
        given = scope.metadata.get("x-request-id", "")
        scope.request_id = given[:128] if given else f"req-{_PREFIX}-{next(_ids)}"


class GuardChain:
    """The links, run around every call that is not public. `router.services.rpc` calls
    open → enter → [the servicer] → leave for each call, in the one wrapper that also parses the
    request and answers errors as statuses."""

    def __init__(
        self,
        links: Sequence[Link],
        *,
        public: Callable[[str], bool],
        observer: CallObserver | None = None,
        default_timeout_s: float | None = None,
    ) -> None:
        self._links = tuple(links)
        self.public = public
        """Whether a method ('/package.Service/Method') is exempt (health, reflection)."""
        self._observer = observer
        self._timeout = default_timeout_s

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

"""A deployment as one generation engine: every call goes through the dispatcher to one of its
replicas' engines (or to a fallback deployment's), retried elsewhere while nothing has streamed.

The servicer cannot tell a deployment from a single model: tokenization, caching, guardrails and
usage happen once, above; only the engine a call runs on is chosen per attempt.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable

from router.routing.attempt import AttemptInfo
from router.routing.dispatch import Dispatcher
from router.scheduler.generation import Chunk, GenerationEngine
from router.scheduler.request import Priority, Request

EngineLookup = Callable[[str, str], GenerationEngine]
"""(deployment, replica) → the replica's engine; raises Unavailable when it is not loaded."""


class RoutedEngine:
    """GenerationEngine over a deployment's replicas (see the module docstring)."""

    def __init__(
        self,
        name: str,
        dispatcher: Dispatcher,
        lookup: EngineLookup,
        engines: Callable[[], Iterable[GenerationEngine]],
        next_id: Callable[[], int],
        *,
        hedged: bool = False,
        on_attempt: Callable[[AttemptInfo], None] | None = None,
    ) -> None:
        """`hedged`: the deployment hedges unary calls (see `_whole`); `on_attempt` sees every
        attempt before it starts (metrics)."""
        self.name = name
        self.hedged = hedged
        """Whether the deployment hedges unary calls (changes with a routing reload)."""
        self._on_attempt = on_attempt
        self._dispatcher = dispatcher
        self._lookup = lookup
        self._engines = engines
        self._next_id = next_id

    def start(self) -> None:
        """Nothing to start: the replicas' engines are started as each one loads."""

    def stop(self) -> None:
        """Nothing to stop: the registry stops the replicas' engines."""

    @property
    def num_unfinished(self) -> int:
        return sum(engine.num_unfinished for engine in self._engines())

    def check_admission(self, priority: Priority) -> None:
        """Nothing to check here: the replica the dispatcher picks admits or sheds."""

    @property
    def num_active(self) -> int:
        return sum(engine.num_active for engine in self._engines())

    @property
    def structured_output(self) -> str:
        """What every replica says when they agree; "" (refused) when one cannot enforce it or
        when they enforce it differently (the router's grammar and a server's own differ)."""
        kinds = {engine.structured_output for engine in self._engines()}
        return kinds.pop() if len(kinds) == 1 else ""

    @property
    def last_output_at(self) -> float:
        return max((engine.last_output_at for engine in self._engines()), default=0.0)

    async def ready(self, timeout_s: float | None = None) -> bool:
        """Whether one of the replicas would take a call now."""
        return self._dispatcher.health()[self.name].serving

    def generate(self, request: Request) -> AsyncIterator[Chunk]:
        if request.unary and self.hedged:
            return self._whole(request)
        return self._dispatcher.stream(
            self.name,
            lambda info: self._attempt(request, info),
            key=request.route_key,
            timeout_s=request.timeout_s,
            request_id=request.request_id,
        )

    async def _whole(self, request: Request) -> AsyncGenerator[Chunk, None]:
        """A unary call on a deployment with hedging: each attempt collects a whole answer, and
        a slow one races a hedge on another replica (streams are never hedged: two could each
        deliver tokens)."""
        chunks = await self._dispatcher.unary(
            self.name,
            lambda info: self._collect(request, info),
            key=request.route_key,
            timeout_s=request.timeout_s,
            request_id=request.request_id,
        )
        for chunk in chunks:
            yield chunk

    async def _collect(self, request: Request, info: AttemptInfo) -> list[Chunk]:
        return [chunk async for chunk in self._attempt(request, info)]

    async def _attempt(self, request: Request, info: AttemptInfo) -> AsyncGenerator[Chunk, None]:
        engine = self._lookup(info.deployment, info.replica.name)
        request.served_by = info.replica.name  # the call's own Request: what usage bills by
        if self._on_attempt is not None:
            self._on_attempt(info)
        if info.attempt > 1:
            # A retry: the failed attempt's engine may have started on the request (status,
            # generated tokens), so the next one gets a fresh copy under a new engine id.
            request = request.copy(self._next_id())
        stream = engine.generate(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

"""What serving needs of a generation engine, whichever kind is behind it: the GenerationEngine
protocol (DecoderEngine: the router batches a step engine; RequestEngineAdapter: the backend
batches; RoutedEngine: a deployment's replicas), the Chunk it streams and its limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from backends.base import ToolCallDelta
from router.errors import RouterError
from router.scheduler.request import Priority, Request, RequestStatus


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one step produced for one request."""

    token_ids: tuple[int, ...]
    text: str
    status: RequestStatus
    error: RouterError | None = None
    tokens: int = -1
    """Tokens this chunk stands for; -1: len(token_ids). Engines that stream text only (remote
    servers) set it, so usage and quotas still count what was generated."""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    """Pieces of tool calls a chat engine's server parsed (models with no local artifact)."""
    prompt_tokens: int = -1
    """On the last chunk: the prompt's tokens as the server counted them; -1: not reported
    (the router's own count stands)."""
    filter_reason: str = ""
    """Set when the server's own content filter ended the answer here."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.tokens < 0 else self.tokens


@dataclass(frozen=True)
class EngineLimits:
    max_slots: int
    token_budget: int
    max_waiting: int
    max_context: int
    max_wait_s: float = 0.0
    """Expected wait for a slot past which a new call is shed (router.scheduler.admission);
    0: only the queue length limits."""
    prefix_cache_bytes: int = 0
    """KV kept for prefix caching (router.scheduler.prefix_cache), for step engines that can
    keep it; 0: off."""


class GenerationEngine(Protocol):
    """What serving needs of a decoder, whichever kind of backend is behind it: DecoderEngine
    (the router batches a step engine) or RequestEngineAdapter (the backend batches)."""

    name: str

    def start(self) -> None:
        """On the event loop that will call generate."""
        ...

    def stop(self) -> None: ...

    @property
    def num_unfinished(self) -> int:
        """Calls waiting on this engine (loop side)."""
        ...

    def check_admission(self, priority: Priority) -> None:
        """Raise ResourceExhausted now when a call of `priority` would be shed (asked before its
        prompt is tokenized); `generate` still decides."""
        ...

    @property
    def num_active(self) -> int:
        """Requests the backend holds."""
        ...

    @property
    def structured_output(self) -> str:
        """Who enforces SamplingParams.structured: "router" (a request needs its grammar
        compiled: the router's step loop masks each step), "engine" (the backend does), or ""
        (no one: such a request is refused)."""
        ...

    def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Chunks until one is finished; closing the iterator cancels the request."""
        ...

    @property
    def last_output_at(self) -> float:
        """time.monotonic() when a chunk last reached a caller (0: never): proof of life for a
        health check that a busy backend is too slow to answer."""
        ...

    async def ready(self, timeout_s: float | None = None) -> bool:
        """Health probe: whether a call made now could be served (never raises); a probe that
        waits on a backend waits at most timeout_s (None: the backend's own default)."""
        ...


def error_chunk(error: RouterError) -> Chunk:
    """The last chunk of a request that failed."""
    return Chunk((), "", RequestStatus.FINISHED_ERROR, error)

"""A generation request as the engine sees it: sampling parameters, life cycle, token buffer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from backends.base import ChatRequest, SamplingParams
from router.errors import InvalidArgument

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from router.structured.compiler import CompiledGrammar


class RequestStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished (vLLM's convention)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_CANCELLED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class Priority(enum.IntEnum):
    """Higher is served first; the native scheduler compares these numbers."""

    LOW = -1
    NORMAL = 0
    HIGH = 1


@dataclass(eq=False)
class Request:
    """One sequence inside the engine. Only the engine thread mutates it after submission."""

    request_id: str
    engine_id: int
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    seed: int = 0
    prompt_text: str = ""
    """The rendered prompt (for request engines that take text); prompt_ids is what counts."""
    route_key: str | None = None
    """Routed models: the conversation's key (same key → same replica while it is healthy)."""
    timeout_s: float | None = None
    """Routed models: the caller's time left when the call was made (None: no deadline)."""
    unary: bool = False
    """The caller waits for the whole answer (Complete): a routed one may be hedged, and a
    request engine may fetch it whole (GenerationRequest.stream)."""
    grammar: CompiledGrammar | None = None
    """Structured output the router enforces (params.structured compiled for this model)."""
    matcher: LLMatcher | None = None
    """The grammar's state for this request: made and advanced on the engine thread."""
    status: RequestStatus = RequestStatus.WAITING
    slot: int = -1
    prefix_blocks: list[int] = field(default_factory=list)
    """Cached prefix blocks pinned for this request until they are copied into its slot."""
    chat: ChatRequest | None = None
    """The conversation itself, for an engine that renders it (a model with no local artifact:
    prompt_ids is then empty)."""
    served_by: str = ""
    """Routed models: the replica whose attempt ran last (a rollout bills by its version)."""
    slot_at: float = 0.0
    """time.monotonic() when it first got a slot (0: not yet); admission measures the time from
    there to the first token."""
    queued_at: float = 0.0
    """time.monotonic() when the engine took it (Scheduler.add_request)."""
    held: bool = False
    """Waiting for a request ahead of it to compute the prefix they share (shared_prefix.py):
    work is being done for it, so the bound on waiting for a slot does not shed it."""
    tokens: npt.NDArray[np.int64] = field(init=False)
    num_tokens: int = field(init=False)
    num_prompt: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt = len(self.prompt_ids)
        self.tokens = np.zeros(self.num_prompt + self.params.max_tokens, dtype=np.int64)
        self.tokens[: self.num_prompt] = self.prompt_ids
        self.num_tokens = self.num_prompt

    def copy(self, engine_id: int) -> Request:
        """A fresh copy under another engine id, as submitted (a retry on another replica)."""
        return Request(
            request_id=self.request_id,
            engine_id=engine_id,
            prompt_ids=self.prompt_ids,
            params=self.params,
            priority=self.priority,
            seed=self.seed,
            prompt_text=self.prompt_text,
            grammar=self.grammar,
            chat=self.chat,
            unary=self.unary,
        )

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt

    @property
    def output_ids(self) -> npt.NDArray[np.int64]:
        return self.tokens[self.num_prompt : self.num_tokens]

    def append(self, token: int) -> None:
        self.tokens[self.num_tokens] = token
        self.num_tokens += 1


MAX_STOPS = 16
"""Stop strings per call (OpenAI allows 4; every one is searched for after every token)."""
MAX_STOP_CHARS = 256
"""Characters per stop string: the detokenizer holds back that much text while it may still be
the start of a stop, so a longer one would delay (or, at 1 MB, swallow) the whole stream."""
MAX_STOP_TOKEN_IDS = 256
"""Stop token ids per call."""


def validate_sampling(params: SamplingParams, vocab_size: int) -> SamplingParams:
    """`params`, or InvalidArgument naming its first out-of-range field (with `field` for
    google.rpc.BadRequest)."""
    checks: tuple[tuple[str, float, float, float], ...] = (
        ("temperature", params.temperature, 0.0, 2.0),
        ("top_p", params.top_p, 1e-9, 1.0),
        ("min_p", params.min_p, 0.0, 1.0),
        ("repetition_penalty", params.repetition_penalty, 1e-9, 2.0),
        ("presence_penalty", params.presence_penalty, -2.0, 2.0),
        ("frequency_penalty", params.frequency_penalty, -2.0, 2.0),
    )
    for name, value, low, high in checks:
        if not low <= value <= high:  # also rejects NaN
            low_text = "0 (exclusive)" if low == 1e-9 else f"{low:g}"
            raise InvalidArgument(
                f"sampling.{name}={value:g} is out of range [{low_text}, {high:g}]",
                field=f"sampling.{name}",
            )
    if params.max_tokens < 1:
        raise InvalidArgument(
            f"sampling.max_tokens={params.max_tokens} must be at least 1",
            field="sampling.max_tokens",
        )
    if params.top_k < 0 or params.top_k > vocab_size:
        raise InvalidArgument(
            f"sampling.top_k={params.top_k} must be in [0, {vocab_size}] (0 disables)",
            field="sampling.top_k",
        )
    for token_id in params.stop_token_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidArgument(
                f"sampling.stop_token_ids has {token_id}, outside the vocabulary [0, {vocab_size})",
                field="sampling.stop_token_ids",
            )
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(
            f"sampling.stop_token_ids has {len(params.stop_token_ids)} ids; at most "
            f"{MAX_STOP_TOKEN_IDS} are allowed",
            field="sampling.stop_token_ids",
        )
    if len(params.stop) > MAX_STOPS:
        raise InvalidArgument(
            f"sampling.stop has {len(params.stop)} strings; at most {MAX_STOPS} are allowed",
            field="sampling.stop",
        )
    for i, text in enumerate(params.stop):
        if not text:
            raise InvalidArgument(f"sampling.stop[{i}] is empty", field="sampling.stop")
        if len(text) > MAX_STOP_CHARS:
            raise InvalidArgument(
                f"sampling.stop[{i}] has {len(text)} characters; at most {MAX_STOP_CHARS} are "
                "allowed",
                field="sampling.stop",
            )
    return params

"""
irouter's C++ core: KV-slot scheduler, batch packing, token sampler and multi-pattern matcher.
"""

from collections.abc import Sequence
from typing import Annotated, overload

import numpy
from numpy.typing import NDArray


class SchedulerOutput:
    """
    One step's plan; row i computes counts[i] tokens of request_ids[i] from position starts[i] in KV slot slots[i].
    """

    @property
    def request_ids(self) -> NDArray[numpy.int64]:
        """int64[n]"""

    @property
    def slots(self) -> NDArray[numpy.int32]:
        """int32[n] KV slot of each row"""

    @property
    def starts(self) -> NDArray[numpy.int32]:
        """int32[n] num_computed before this step"""

    @property
    def counts(self) -> NDArray[numpy.int32]:
        """int32[n] tokens to compute this step"""

    @property
    def sample(self) -> NDArray[numpy.bool_]:
        """bool[n] True when this row's logits give the next token"""

    @property
    def preempted(self) -> NDArray[numpy.int64]:
        """int64[k] requests that lost their slot this step (recompute later)"""

    def __len__(self) -> int: ...

class Scheduler:
    """Continuous batching over fixed KV slots; decides, never runs a model."""

    def __init__(self, max_slots: int, token_budget: int, max_waiting: int, max_context: int) -> None: ...

    def add_request(self, request_id: int, num_prompt_tokens: int, max_new_tokens: int, priority: int = 0, num_cached: int = 0) -> bool:
        """
        Queue a request; False when the waiting queue is full (shed load). num_cached prompt tokens come from a prefix cache: its first row starts there. Raises ValueError on a duplicate id or a request that cannot fit.
        """

    def schedule(self, budget: int = 0) -> SchedulerOutput:
        """
        Plan the next step and advance num_computed by it; budget (tokens this step, at most token_budget; 0: token_budget) keeps a step short while sequences decode.
        """

    @overload
    def append_tokens(self, request_ids: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)]) -> None:
        """Each listed request received one sampled token."""

    @overload
    def append_tokens(self, request_ids: Sequence[int]) -> None: ...

    @overload
    def finish_requests(self, request_ids: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)]) -> None:
        """
        Forget finished, cancelled or failed requests and free their slots now; unknown ids are ignored.
        """

    @overload
    def finish_requests(self, request_ids: Sequence[int]) -> None: ...

    def has_unfinished(self) -> bool: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_free_slots(self) -> int: ...

    @property
    def max_slots(self) -> int: ...

def pack(tokens: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], offsets: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], pad_id: int, pad_to: int = 0) -> tuple[NDArray[numpy.int64], NDArray[numpy.int64]]:
    """
    Right-pad ragged rows tokens[offsets[b]:offsets[b+1]] into (input_ids, attention_mask), both int64[B, max(longest row, pad_to)].
    """

def sample(logits: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], temperature: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], top_k: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], top_p: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], min_p: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], repetition_penalty: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], presence_penalty: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], frequency_penalty: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], seeds: Annotated[NDArray[numpy.uint64], dict(order='C', device='cpu', writable=False)], tokens: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], offsets: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], prompt_lens: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], masks: Annotated[NDArray[numpy.uint32], dict(order='C', device='cpu', writable=False)] | None = None, mask_rows: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)] | None = None) -> NDArray[numpy.int64]:
    """
    One token per row of logits (float32[B, V], never modified). masks (uint32[M, W], bit t of a row allows token t) with mask_rows (int32[B], -1: free) restrict rows to the tokens a grammar allows. Exact semantics and RNG are documented in native/include/irouter/sampler.h.
    """

class Matcher:
    """
    Aho-Corasick blocklist matcher over UTF-8. Offsets are character (code point) offsets; every occurrence is reported, overlapping ones and duplicate patterns included. Exact semantics in native/include/irouter/matcher.h.
    """

    def __init__(self, patterns: Sequence[str], case_insensitive: bool = False, whole_words: bool = False) -> None:
        """
        case_insensitive folds ASCII letters only (no Unicode case folding). whole_words: a match counts only where the characters around it are not ASCII [A-Za-z0-9_] (non-ASCII characters count as boundaries). Raises ValueError naming the index of an empty pattern.
        """

    @property
    def num_patterns(self) -> int: ...

    @property
    def case_insensitive(self) -> bool: ...

    @property
    def whole_words(self) -> bool: ...

    def find_all(self, text: str) -> list[tuple[int, int, int]]:
        """
        Every match as (start, end, pattern_id), character offsets, sorted by end then pattern_id.
        """

    def contains(self, text: str) -> bool:
        """Whether find_all(text) would be non-empty; stops at the first match."""

    def stream(self) -> MatcherStream:
        """A new stream for matching text that arrives in chunks."""

class MatcherStream:
    """
    Incremental matching over a sequence of chunks (from Matcher.stream()). Offsets count characters from the start of the stream; a pattern split across chunks is reported by the chunk that completes it. With whole_words, a match ending exactly at the end of what was fed is held until the next non-empty chunk or finish() shows what follows it. Use each stream from one thread at a time.
    """

    def feed(self, chunk: str) -> list[tuple[int, int, int]]:
        """
        Matches completed (and, with whole_words, decided) by this chunk. Raises RuntimeError after finish().
        """

    def finish(self) -> list[tuple[int, int, int]]:
        """End of stream: the matches held for whole_words. Idempotent."""

    def holdback(self) -> int:
        """
        Trailing characters of the stream so far that may still belong to an unreported match (the longest suffix that is a proper prefix of a pattern, or a held whole_words match): withhold them from output so a redaction never leaks half a term. 0 after finish().
        """

    @property
    def position(self) -> int:
        """Characters fed so far."""

"""
irouter's C++ core: KV-slot scheduler, batch packing and token sampler.
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

    def add_request(self, request_id: int, num_prompt_tokens: int, max_new_tokens: int, priority: int = 0) -> bool:
        """
        Queue a request; False when the waiting queue is full (shed load). Raises ValueError on a duplicate id or a request that cannot fit.
        """

    def schedule(self) -> SchedulerOutput:
        """Plan the next step and advance num_computed by it."""

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

def sample(logits: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], temperature: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], top_k: Annotated[NDArray[numpy.int32], dict(order='C', device='cpu', writable=False)], top_p: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], min_p: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], repetition_penalty: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], presence_penalty: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], frequency_penalty: Annotated[NDArray[numpy.float32], dict(order='C', device='cpu', writable=False)], seeds: Annotated[NDArray[numpy.uint64], dict(order='C', device='cpu', writable=False)], tokens: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], offsets: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)], prompt_lens: Annotated[NDArray[numpy.int64], dict(order='C', device='cpu', writable=False)]) -> NDArray[numpy.int64]:
    """
    One token per row of logits (float32[B, V], never modified). Exact semantics and RNG are documented in native/include/irouter/sampler.h.
    """

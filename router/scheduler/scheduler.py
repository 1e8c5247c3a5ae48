"""The scheduler of the router's own engine: vLLM's v1 contract over the native core.

    add_request(request)                queue a request (or hold it while a request ahead of
                                         it computes a prefix they share: shared_prefix.py),
                                         or the error that refuses it
    release_held(out)                    queue the held requests whose wait is over (the engine
                                         thread, before each step)
    schedule() -> SchedulerOutput        the next step: which requests, in which KV slots, how
                                         many of their tokens to compute
    update_from_output(output, result)   each sampled row's token: stop tokens, stop strings,
                                         max_tokens, detokenized text; the callers' chunks
    finish_requests(ids, status)         forget requests that ended outside a step (cancelled)

It decides; it never runs a model (runner.py does). There is no prefill phase and no decode
phase: a row computes `counts[i]` tokens from position `starts[i]`, one token for a running
sequence, a chunk of its prompt for a new one (chunked under the token budget), and is sampled
when its last computed token is the last one it has. The native core (router._native.Scheduler)
owns token counts, slots, queues by priority and preemption; the Python `Request` mirrors the
slot and status that the engine thread reads, and holds the token buffer.

A row that fails (its prefill, decode or sampling in the runner, its detokenization here) fails
alone: its request ends with an error chunk and the other rows of the step go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from router import _native
from router.errors import Internal, ResourceExhausted, RouterError
from router.scheduler.detokenizer import Detokenizer, TokenCodec, TokenDecoder
from router.scheduler.generation import Chunk, EngineLimits, error_chunk
from router.scheduler.prefix_cache import PrefixCache
from router.scheduler.request import Request, RequestStatus
from router.scheduler.shared_prefix import Plan, SharedPrefixes

logger = logging.getLogger(__name__)

Out = list[tuple[int, Chunk]]
"""(engine id, chunk) pairs for the callers, in order."""


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step's plan, as the runner executes it."""

    plan: _native.SchedulerOutput | Plan
    """Row i: request_ids[i] computes counts[i] tokens from starts[i] in KV slot slots[i];
    sample[i] says whether its logits give the next token."""
    requests: list[Request]
    """The plan's requests, in row order."""
    freed_slots: list[int] = field(default_factory=list)
    """KV slots of requests that ended since the last step: the runner releases them before
    anything else (a freed slot may be handed to a new request in this very plan)."""
    loads: list[tuple[int, list[int]]] = field(default_factory=list)
    """(row, cached prefix blocks) of requests admitted in this plan with a cached prefix: the
    runner copies the blocks into the row's slot (and unpins them) before computing it."""
    prefixes: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Row -> (slot, n): the row's prompt chunk reads positions 0..n-1 from that slot, whose
    rows of this step compute them (a follower joining its leader: shared_prefix.py)."""


@dataclass(slots=True)
class ReplyFill:
    """A finished request's reply, computed again through the prompt graph into the slot it
    left, so that its conversation's next turn finds it in the prefix cache (prefix_cache.py)."""

    slot: int
    tokens: npt.NDArray[np.int64]
    """Its prompt and reply ids (the reply as the next turn will hold it, once prepared)."""
    prompt: int
    """Prompt tokens: the reply starts there."""
    start: int
    """The next position to compute (first: the start of the block the prompt ends in)."""
    end: int
    """The end of the reply's last whole block, what the cache can keep (-1 until the engine
    first comes to it: Scheduler._prepare)."""
    stop: tuple[str, ...] = ()
    """The request's stop strings: a reply cut at one was sent up to it."""
    stop_token_ids: frozenset[int] = frozenset()
    """The request's own stop tokens: one that ended it was not sent."""

    def chunk(self, limit: int) -> tuple[int, int]:
        """The next (start, end) to compute: `limit` tokens at most."""
        return self.start, min(self.end, self.start + limit)


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    """What executing a SchedulerOutput produced, by row."""

    tokens: dict[int, int] = field(default_factory=dict)
    """Row → the token sampled for it (rows with sample[i] that did not fail)."""
    errors: dict[int, str] = field(default_factory=dict)
    """Row → what failed for it (prefill, decode, sampling), to fail that request alone."""


class Scheduler:
    """See the module docstring. Used by the engine thread only."""

    def __init__(
        self,
        name: str,
        limits: EngineLimits,
        decoder: TokenDecoder,
        stop_ids: Sequence[int],
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.name = name
        self.prefix_cache = prefix_cache
        self._shared = SharedPrefixes(prefix_cache) if prefix_cache is not None else None
        """Requests held back until a request ahead of them has cached the prefix they share
        (shared_prefix.py): in `requests`, not yet in the native core."""
        self.decode_is_prefill = False
        """True where the backend computes a decoded token as a prompt's (`mixed_steps`): a
        finished reply's blocks are then cached as it ends, not only by a fill."""
        self.borrow_prefixes = False
        """True where the backend's prompt chunks read a prefix from another slot
        (backends.base.PrefixBorrowing): held followers then join their leader's step."""
        self.limits = limits
        self._decoder = decoder
        self._stop_ids = frozenset(stop_ids)
        self._native = _native.Scheduler(
            max_slots=limits.max_slots,
            token_budget=limits.token_budget,
            # Everything admitted on the loop side waits here until its first step, so the
            # native queue must hold running + waiting; the loop-side check sheds load first.
            max_waiting=limits.max_waiting + limits.max_slots,
            max_context=limits.max_context,
        )
        self.requests: dict[int, Request] = {}
        """Requests held, by engine id."""
        self._detok: dict[int, Detokenizer] = {}
        self._freed: list[int] = []
        self._fills: list[ReplyFill] = []
        """Replies to compute again while the engine is idle, in the slots they left (freed:
        dropped as soon as a plan may hand those slots out)."""

    @property
    def num_waiting(self) -> int:
        return self._native.num_waiting + (len(self._shared) if self._shared else 0)

    @property
    def num_running(self) -> int:
        return self._native.num_running

    @property
    def num_decoding(self) -> int:
        """Requests holding a slot with tokens generated: each takes one token of a step. (A
        preempted one recomputing its tokens counts too, for the steps of its recompute.)"""
        return sum(1 for r in self.requests.values() if r.slot >= 0 and r.num_output > 0)

    def decoding(self) -> tuple[int, int]:
        """num_decoding, and of those the ones with only their first token (StepPacer.budget's
        `fresh`: a burst's first finishers), in one pass (every step). None is fresh when a
        request still in its prompt was queued after they got their slots: that one is not
        of their burst, and the whole budget for it would hold their second tokens up (8
        streams restarting together while a 160-token prompt came: their next token 110-125
        ms later, 15x their gap)."""
        decoding = fresh = 0
        fresh_slot_at = newest_prompt_at = 0.0
        for r in self.requests.values():
            if r.slot >= 0 and r.num_output > 0:
                decoding += 1
                if r.num_output == 1:
                    fresh += 1
                    fresh_slot_at = max(fresh_slot_at, r.slot_at)
            elif not r.num_output:
                newest_prompt_at = max(newest_prompt_at, r.queued_at)
        return decoding, fresh if newest_prompt_at <= fresh_slot_at else 0

    def has_unfinished(self) -> bool:
        return self._native.has_unfinished() or bool(self._shared)

    def add_request(self, req: Request) -> RouterError | None:
        """Queue `req`, or hold it back for a prefix a request ahead of it is computing; the
        error that refuses it instead (queue full), or None."""
        req.queued_at = time.monotonic()
        if self._shared is not None and self._shared.hold(req, self.requests.values()):
            # Admission (loop side) bounds what is held with what waits: no queue to check.
            self._register(req)
            return None
        error = self._submit(req)
        if error is None:
            self._register(req)
        return error

    def _register(self, req: Request) -> None:
        self.requests[req.engine_id] = req
        self._detok[req.engine_id] = Detokenizer(self._decoder, req.params.stop)

    def release_held(self, out: Out) -> None:
        """Queue the held requests whose shared prefix is cached now, or will not be (their
        leader ended or finished its prompt); each is refused instead when the queue is full.
        The engine thread calls this before each step."""
        if not self._shared:
            return
        for req in self._shared.due():
            error = self._submit(req)
            if error is not None:
                self.fail(req.engine_id, error, out)

    def _submit(self, req: Request) -> RouterError | None:
        """Into the native core, with its cached prefix pinned; the error that refuses it."""
        cache = self.prefix_cache
        blocks = [] if cache is None else cache.match(req.tokens, req.num_prompt)
        req.prefix_blocks = blocks
        try:
            admitted = self._native.add_request(
                request_id=req.engine_id,
                num_prompt_tokens=req.num_prompt,
                max_new_tokens=req.params.max_tokens,
                priority=int(req.priority),
                num_cached=len(blocks) * cache.block_size if cache is not None else 0,
            )
        except ValueError as exc:  # validated before submission; this is a bug if it happens
            self._unpin(req)
            return Internal(str(exc))
        if not admitted:
            self._unpin(req)
            return ResourceExhausted(
                f"model {self.name!r} queue is full ({self.limits.max_waiting} waiting); "
                "retry shortly"
            )
        return None

    def finish_requests(self, engine_ids: Sequence[int], status: RequestStatus) -> None:
        """Forget the requests (unknown ids are ignored); their slots are freed at the next
        step."""
        for engine_id in engine_ids:
            if self._shared is not None:
                self._shared.forget(engine_id)
            req = self.requests.pop(engine_id, None)
            self._detok.pop(engine_id, None)
            if req is None:
                continue
            req.status = status
            self._unpin(req)
            if req.slot >= 0:
                self._freed.append(req.slot)
                req.slot = -1
        self._native.finish_requests(list(engine_ids))

    def fail(self, engine_id: int, error: RouterError, out: Out) -> None:
        """End one request with `error` (a chunk for its caller)."""
        self.finish_requests([engine_id], RequestStatus.FINISHED_ERROR)
        out.append((engine_id, error_chunk(error)))

    def fail_all(self, error: RouterError, out: Out) -> None:
        for engine_id in list(self.requests):
            self.fail(engine_id, error, out)

    def schedule(self, budget: int = 0) -> SchedulerOutput:
        """The next step's plan; `budget` tokens at most (0: the token_budget)."""
        native = self._native.schedule(budget=budget)
        plan: _native.SchedulerOutput | Plan = native
        joined: dict[int, tuple[int, int]] = {}
        if self.borrow_prefixes and self._shared:
            limit = self.limits.token_budget
            left = (min(budget, limit) if budget > 0 else limit) - int(native.counts.sum())
            plan, joined = self._shared.join_leaders(self._native, native, left)
        for engine_id in plan.preempted:
            req = self.requests.get(int(engine_id))
            if req is not None:
                req.status = RequestStatus.PREEMPTED
                req.slot = -1
                self._unpin(req)  # it will compute everything again (its slot was given away)
        reqs = [self.requests[int(i)] for i in plan.request_ids]
        now = time.monotonic()
        loads: list[tuple[int, list[int]]] = []
        for row, (req, slot) in enumerate(zip(reqs, plan.slots.tolist(), strict=True)):
            req.slot = slot
            req.status = RequestStatus.RUNNING
            if not req.slot_at:
                req.slot_at = now
            if req.prefix_blocks:  # admitted now: its cached prefix goes into its slot first
                loads.append((row, req.prefix_blocks))
                req.prefix_blocks = []
        prefixes = (  # most steps join no one: no pass over the rows then
            {row: joined[r.engine_id] for row, r in enumerate(reqs) if r.engine_id in joined}
            if joined
            else {}
        )
        return SchedulerOutput(plan, reqs, self.take_freed_slots(), loads, prefixes)

    def _unpin(self, req: Request) -> None:
        """Release a request's cached prefix blocks that were never copied into a slot."""
        if req.prefix_blocks and self.prefix_cache is not None:
            self.prefix_cache.release(req.prefix_blocks)
        req.prefix_blocks = []

    def take_freed_slots(self) -> list[int]:
        """Slots of requests that ended since the last call, for the runner to release (their
        replies not computed again by then are not: the slots may go to new requests)."""
        freed, self._freed = self._freed, []
        self.drop_fills()
        return freed

    def drop_fills(self) -> None:
        self._fills.clear()

    @property
    def pending_fills(self) -> int:
        return len(self._fills)

    def next_fill(self, limit: int) -> tuple[ReplyFill, int, int] | None:
        """The next chunk of a finished reply to compute (the engine calls this only when idle):
        (fill, start, end); the fill advances past it. None when there is none."""
        cache = self.prefix_cache
        while self._fills and cache is not None:
            fill = self._fills[0]
            if fill.end < 0:
                self._prepare(fill, cache.block_size)
            if fill.end <= fill.start:  # no whole block past the prompt's
                self._fills.pop(0)
                continue
            start, end = fill.chunk(limit)
            fill.start = end
            if end >= fill.end:
                self._fills.pop(0)
            return fill, start, end
        return None

    def _prepare(self, fill: ReplyFill, block_size: int) -> None:
        """The reply as the conversation's next turn will hold it: its text sent back, tokenized
        again (a model's tokens need not be the text's own: "7:12" generated as 7, :, 1, 2 comes
        back as 7, :, 12), up to the stop string that ended it if one did, else with the model's
        stop token that ended it, which chat templates close the turn with (a caller's own stop
        token is not sent back). Then the end of its last whole block within the context."""
        reply = fill.tokens[fill.prompt :].tolist()
        if isinstance(self._decoder, TokenCodec):
            last = reply[-1:]
            # The caller's own stop token ended it: neither its text nor a closing token follow.
            if last and last[0] in fill.stop_token_ids:
                reply, last = reply[:-1], []
            stop = last if last and last[0] in self._stop_ids else []
            text = self._decoder.decode(reply[: len(reply) - len(stop)])
            cut = min((i for i in map(text.find, fill.stop) if i >= 0), default=-1)
            if cut >= 0:  # the caller got the text up to its stop string, and no stop token
                text, stop = text[:cut], []
            ids = [*self._decoder.encode(text, add_special_tokens=False).ids, *stop]
            fill.tokens = np.concatenate([fill.tokens[: fill.prompt], np.asarray(ids, np.int64)])
        fill.end = min(len(fill.tokens), self.limits.max_context) // block_size * block_size

    def _keep_reply(self, req: Request) -> None:
        """Queue a finished request's reply to be computed again by the prompt graph once the
        engine is idle. Its KV came from decode steps, which round differently from a prompt's
        computation, so it cannot be cached as it is: the cache holds only what a prefill of the
        same tokens computes (an answer never depends on the cache)."""
        cache = self.prefix_cache
        if cache is not None and req.slot >= 0 and req.num_output:
            tokens = req.tokens[: req.num_tokens].copy()
            if self.decode_is_prefill:
                # Its decode steps computed the reply as a prompt would, bit for bit: the whole
                # blocks of what the slot holds (all but the last token) are cached now, for a
                # next turn sent at once; the fill still comes for where the reply's text
                # tokenizes differently from its tokens.
                cache.save(req.slot, tokens, req.num_tokens - 1)
            # From the start of the block the prompt ends in: that block's whole KV is then the
            # prompt graph's, over chunks of at least two tokens, as a cache-off prefill's.
            start = req.num_prompt // cache.block_size * cache.block_size
            params = req.params
            stops = frozenset(params.stop_token_ids)
            fill = ReplyFill(req.slot, tokens, req.num_prompt, start, -1, params.stop, stops)
            self._fills.append(fill)

    def update_from_output(self, output: SchedulerOutput, result: RunnerOutput) -> Out:
        """Chunks for the callers of this step's rows: an error for each failed row, a token
        (with its text, once whole) for each sampled one."""
        out: Out = []
        reqs = output.requests
        for row, message in result.errors.items():
            self.fail(reqs[row].engine_id, Internal(message), out)
        if self.prefix_cache is not None:
            self._save_prefill(output, result)
        appended: list[int] = []
        for row, token in result.tokens.items():
            req = reqs[row]
            if req.engine_id not in self.requests:
                continue  # ended meanwhile
            try:
                chunk = self._update(req, token)
            except Exception:
                logger.exception("engine %s: detokenizing failed for %s", self.name, req.request_id)
                self.fail(req.engine_id, Internal("detokenizing this request failed"), out)
                continue
            if chunk.status.is_finished:
                self._keep_reply(req)
                self.finish_requests([req.engine_id], chunk.status)
            else:
                appended.append(req.engine_id)
            out.append((req.engine_id, chunk))
        if appended:
            self._native.append_tokens(np.array(appended, dtype=np.int64))
        return out

    def _save_prefill(self, output: SchedulerOutput, result: RunnerOutput) -> None:
        """Keep the prompt blocks this step's prefill rows computed, so that requests arriving
        meanwhile with the same prefix find it (not only once this one ends)."""
        assert self.prefix_cache is not None
        plan = output.plan
        for row, req in enumerate(output.requests):
            if plan.starts[row] >= req.num_prompt:
                continue  # a generated token (decode): not a prompt block
            if row not in result.errors and req.engine_id in self.requests:
                end = min(int(plan.starts[row] + plan.counts[row]), req.num_prompt)
                self.prefix_cache.save(req.slot, req.tokens, end)
                if self._shared:
                    self._shared.computed(req.engine_id, end)

    def _update(self, req: Request, token: int) -> Chunk:
        """Append one sampled token; the chunk saying what it means for the caller."""
        req.append(token)
        detok = self._detok[req.engine_id]
        status = RequestStatus.RUNNING
        text = ""
        if (
            token in self._stop_ids and not req.params.ignore_eos
        ) or token in req.params.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        else:
            text, hit_stop = detok.add(token)
            if hit_stop:
                status = RequestStatus.FINISHED_STOPPED
        if not status.is_finished and req.num_output >= req.params.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status.is_finished:
            # Text held back only because it might have begun a stop string is released.
            text += detok.flush()
        return Chunk((token,), text, status)

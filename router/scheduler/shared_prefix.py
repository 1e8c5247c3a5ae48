"""Prefixes shared within a burst: a request whose prompt shares blocks not cached yet with a
request still computing its prompt waits for the cache to hold them, instead of computing them
again beside it.

The prefix cache (prefix_cache.py) saves a prompt's blocks as its chunks finish, so a request
that arrives after them skips them. Requests that arrive together find nothing yet: 16 calls
sharing a system prompt nothing has cached would each compute it, and calls sharing more than
what is cached (the chat template's turn opening, a common question stem) each compute the
shared tail. So a request (the follower) whose prompt shares at least one whole block beyond its
cached prefix with a request still in its prompt (the leader, of the same priority or higher)
is held back from the native scheduler until the leader's chunks have computed those blocks
(each chunk saves its whole blocks as it finishes), or until the leader can no longer give them:
it ended, or finished its prompt. The follower then matches the cache as any request does and
computes only the rest (all of it, where a full pool kept nothing).

A follower waits for the leader's chunk that covers the shared part, one step when the prompts
are short; the step it then joins is smaller by the shared part. SGLang's scheduler does the
same within its waiting queue ("in-batch prefix caching"). Held requests count as waiting; they
hold no slot and no cache block.

Where the step engine can read a prompt's first positions from another slot
(backends.base.PrefixBorrowing: the native kernels), a follower whose leader computes the shared
part in the step being planned joins that very step instead (join_leaders, from
Scheduler.schedule): its rows read the shared positions from the leader's slot, which holds them
once each layer's keys and values are stored, and the engine copies them into the follower's
slot after the step's tokens are delivered. 16 requests sharing a cached system prompt and a
question stem one block past it: no lone step for the leader, no loads for the others.

An answer never depends on either: the follower's prefix is the cache's, or the leader's slot's,
computed by a prefill as any cached prefix is, the same bits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from router import _native
from router.scheduler.prefix_cache import MIN_COMPUTED, PrefixCache
from router.scheduler.request import Request


@dataclass(frozen=True, slots=True)
class Plan:
    """A native plan with rows appended (followers joining their leaders' step:
    SharedPrefixes.join_leaders); the same fields as router._native.SchedulerOutput."""

    request_ids: npt.NDArray[np.int64]
    slots: npt.NDArray[np.int32]
    starts: npt.NDArray[np.int32]
    counts: npt.NDArray[np.int32]
    sample: npt.NDArray[np.bool_]
    preempted: npt.NDArray[np.int64]

    @classmethod
    def joined(cls, first: _native.SchedulerOutput, then: _native.SchedulerOutput) -> Plan:
        return cls(
            request_ids=np.concatenate([first.request_ids, then.request_ids]),
            slots=np.concatenate([first.slots, then.slots]),
            starts=np.concatenate([first.starts, then.starts]),
            counts=np.concatenate([first.counts, then.counts]),
            sample=np.concatenate([first.sample, then.sample]),
            preempted=first.preempted,
        )


@dataclass(slots=True)
class _Held:
    follower: Request
    leader: Request
    end: int
    """Prompt tokens of the follower (whole blocks) it waits for the leader to compute."""
    leader_computed: int = 0
    """Prompt tokens the leader has computed (`computed`): its chunks save their blocks as they
    finish, so once this covers `end` the cache holds the share, or could not keep it (a full
    pool), and the follower waits no longer either way."""


class SharedPrefixes:
    """Followers held back for their leaders' blocks; used by the engine thread only."""

    def __init__(self, cache: PrefixCache) -> None:
        self._cache = cache
        self._held: dict[int, _Held] = {}
        """By the follower's engine id, in arrival order."""

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, req: Request, candidates: Iterable[Request]) -> bool:
        """Hold `req` back when it shares a whole block beyond its cached prefix with one of
        `candidates` still in its prompt (the longest such share is waited for); False when
        it should be scheduled now."""
        size = self._cache.block_size
        limit = req.num_prompt - MIN_COMPUTED  # what the cache can give it (prefix_cache.match)
        best: _Held | None = None
        end = self._cache.cached_tokens(req.tokens, req.num_prompt) + size
        for other in candidates:
            if other.num_output or other.priority < req.priority or other.engine_id in self._held:
                continue
            n = min(limit, other.num_prompt)
            # The block that would have to be shared next first: most prompts differ there,
            # and a whole-prefix compare per candidate and arrival adds up (272 in flight of
            # 4,000 tokens sharing 300: 2.0 ms an arrival without this check, 0.7 with it).
            if n < end or not np.array_equal(
                req.tokens[end - size : end], other.tokens[end - size : end]
            ):
                continue
            differ = np.flatnonzero(req.tokens[:n] != other.tokens[:n])
            shared = (int(differ[0]) if differ.size else n) // size * size
            if shared >= end:
                best, end = _Held(req, other, shared), shared + size
        if best is None:
            return False
        self._held[req.engine_id] = best
        req.held = True
        return True

    def join_leaders(
        self, native: _native.Scheduler, plan: _native.SchedulerOutput, left: int
    ) -> tuple[_native.SchedulerOutput | Plan, dict[int, tuple[int, int]]]:
        """Held followers whose leader computes the shared blocks in `plan` join it, as rows
        reading those blocks from the leader's slot (the backend's PrefixBorrowing), where the
        `left` tokens of the step's budget take each one's whole remaining prompt and a slot is
        free for it, in arrival order; the plan with their rows appended, and engine id ->
        (leader's slot, tokens shared) of those who joined.

        The native core then holds nothing else to schedule (nothing waiting, every running
        sequence's rows given: the budget was not spent), so a second plan holds exactly the
        followers submitted here, each in a free slot with its whole prompt, none preempted."""
        free = native.num_free_slots
        if left <= 0 or not free or native.num_waiting:
            return plan, {}
        chunks = {  # engine id -> (slot, end of its chunk) of the plan's rows
            int(engine_id): (int(slot), int(start + count))
            for engine_id, slot, start, count in zip(
                plan.request_ids.tolist(),
                plan.slots.tolist(),
                plan.starts.tolist(),
                plan.counts.tolist(),
                strict=True,
            )
        }
        joined: dict[int, tuple[int, int]] = {}
        room = left
        for held in list(self._held.values()):
            follower, chunk = held.follower, chunks.get(held.leader.engine_id)
            if chunk is None or chunk[1] < held.end:
                continue
            if follower.num_prompt - held.end > room or len(joined) == free:
                break  # in arrival order: no later follower overtakes this one
            try:
                admitted = native.add_request(
                    request_id=follower.engine_id,
                    num_prompt_tokens=follower.num_prompt,
                    max_new_tokens=follower.params.max_tokens,
                    priority=int(follower.priority),
                    num_cached=held.end,
                )
            except ValueError:  # a bug: it stays held, and its submission then refuses it alone
                break
            if not admitted:  # cannot happen with nothing waiting; it then stays held
                break
            del self._held[follower.engine_id]
            follower.held = False
            self._cache.count_shared(follower.num_prompt, held.end)
            joined[follower.engine_id] = (chunk[0], held.end)
            room -= follower.num_prompt - held.end
        if not joined:
            return plan, {}
        then = native.schedule(budget=left)
        if len(then.preempted) or sorted(then.request_ids.tolist()) != sorted(joined):
            raise RuntimeError(  # the invariant above broke: fail the step, not its answers
                f"followers {sorted(joined)} joining their leaders' step were planned as "
                f"{then.request_ids.tolist()} (preempted {then.preempted.tolist()})"
            )
        return Plan.joined(plan, then), joined

    def computed(self, engine_id: int, end: int) -> None:
        """Request `engine_id` has computed its prompt up to `end` (a prefill chunk ended)."""
        for held in self._held.values():
            if held.leader.engine_id == engine_id:
                held.leader_computed = end

    def forget(self, engine_id: int) -> None:
        """A held request ended (cancelled, failed); unknown ids are ignored."""
        held = self._held.pop(engine_id, None)
        if held is not None:
            held.follower.held = False

    def due(self) -> list[Request]:
        """The followers to schedule now, in arrival order: their leader has computed the
        blocks they share (and saved them, where the pool had room), or it can no longer (it
        ended or finished its prompt)."""
        ready = []
        for engine_id, held in list(self._held.items()):
            leader = held.leader
            if leader.status.is_finished or leader.num_output or held.leader_computed >= held.end:
                del self._held[engine_id]
                held.follower.held = False
                ready.append(held.follower)
        return ready

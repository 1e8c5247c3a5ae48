"""Requests that arrive together sharing a prefix nothing has cached: the followers wait for the
leader's blocks instead of computing them too (router.scheduler.shared_prefix), driven through
the Scheduler by hand over the TokenStore, whose "KV" is the tokens themselves."""

from __future__ import annotations

import asyncio
import itertools

from backends.base import SamplingParams
from router.scheduler.engine import DecoderEngine
from router.scheduler.generation import EngineLimits
from router.scheduler.prefix_cache import PrefixCache
from router.scheduler.request import Priority, Request, RequestStatus
from router.scheduler.scheduler import Out, RunnerOutput, Scheduler, SchedulerOutput
from tests.unit.router.scheduler.test_engine_fill import (
    CONTEXT,
    Codec,
    HashKV,
    ask,
    reference,
)
from tests.unit.router.scheduler.test_engine_fill import (
    EOS as HASH_EOS,
)
from tests.unit.router.scheduler.test_prefix_cache import B, TokenStore
from tests.unit.router.scheduler.test_scheduler import EOS, Decoder

_ids = itertools.count(1000)
SHARED = list(range(10, 22))
"""Three blocks of 4 tokens that the requests below begin with."""


def make_scheduler(
    max_slots: int = 4, num_blocks: int = 16, borrow: bool = False
) -> tuple[Scheduler, PrefixCache, TokenStore]:
    """`borrow`: the engine's prompt chunks read a prefix from another slot (followers join
    their leader's step)."""
    store = TokenStore()
    store.open_pool(num_blocks, B)
    cache = PrefixCache(store, num_blocks=num_blocks, block_size=B)
    limits = EngineLimits(max_slots, token_budget=64, max_waiting=8, max_context=64)
    scheduler = Scheduler("test", limits, Decoder(), stop_ids=[EOS], prefix_cache=cache)
    scheduler.borrow_prefixes = borrow
    return scheduler, cache, store


def request(*tail: int, priority: Priority = Priority.NORMAL) -> Request:
    engine_id = next(_ids)
    return Request(
        request_id=f"r{engine_id}",
        engine_id=engine_id,
        prompt_ids=[*SHARED, *tail],
        params=SamplingParams(max_tokens=4),
        priority=priority,
    )


def step(scheduler: Scheduler, store: TokenStore, budget: int = 0) -> tuple[SchedulerOutput, Out]:
    """Release what is due, then one step of `budget` tokens (0: the token_budget): each row
    computed (cached blocks loaded first, as the runner does), each sampling row given token 5."""
    out: Out = []
    scheduler.release_held(out)
    plan = scheduler.schedule(budget)
    assert scheduler.prefix_cache is not None
    for row, blocks in plan.loads:
        scheduler.prefix_cache.load(int(plan.plan.slots[row]), blocks)
    for row, req in enumerate(plan.requests):
        if row in plan.prefixes:  # read from the lender's slot, which holds it by now
            lender, n = plan.prefixes[row]
            assert (store.slots[lender, :n] == req.tokens[:n]).all()
            store.compute(int(plan.plan.slots[row]), store.slots[lender, :n])
        assert store.lengths[int(plan.plan.slots[row])] >= int(plan.plan.starts[row])
        end = int(plan.plan.starts[row] + plan.plan.counts[row])
        store.compute(int(plan.plan.slots[row]), req.tokens[:end])
    sampled = {row: 5 for row in range(len(plan.requests)) if plan.plan.sample[row]}
    return plan, out + scheduler.update_from_output(plan, RunnerOutput(tokens=sampled))


def computed(plan: SchedulerOutput) -> dict[int, tuple[int, int]]:
    """engine id -> (start, count) of the plan's rows."""
    return {
        req.engine_id: (int(plan.plan.starts[row]), int(plan.plan.counts[row]))
        for row, req in enumerate(plan.requests)
    }


def test_followers_wait_one_step_and_compute_only_what_they_do_not_share() -> None:
    scheduler, cache, store = make_scheduler()
    leader, follower, other = request(30, 31), request(40, 41), request(50, 51)
    for req in (leader, follower, other):
        assert scheduler.add_request(req) is None
    assert scheduler.num_waiting == 3 and scheduler.has_unfinished()

    first, _ = step(scheduler, store)
    # Only the leader computes the 12 shared tokens; the others wait for them to be cached.
    assert computed(first) == {leader.engine_id: (0, 14)}
    assert cache.cached_blocks == 3 and cache.queried_tokens == 14  # the held were not counted
    second, out = step(scheduler, store)
    assert computed(second) == {
        leader.engine_id: (14, 1),
        follower.engine_id: (12, 2),
        other.engine_id: (12, 2),
    }
    assert cache.hit_tokens == 24 and cache.queried_tokens == 14 * 3
    # Each slot holds its own prompt: the shared blocks were loaded, not computed again.
    for req in (follower, other):
        assert (store.slots[req.slot, :14] == req.tokens[:14]).all()
    assert {engine_id for engine_id, chunk in out if chunk.token_ids} == {
        leader.engine_id,
        follower.engine_id,
        other.engine_id,
    }


def test_followers_join_the_leaders_step_where_the_engine_reads_the_share_there() -> None:
    scheduler, cache, store = make_scheduler(borrow=True)
    leader, follower, other = request(30, 31), request(40, 41), request(50, 51)
    for req in (leader, follower, other):
        assert scheduler.add_request(req) is None
    plan, out = step(scheduler, store)
    # One step: the followers compute only their own tokens, reading the 12 shared ones from
    # the leader's slot (the step helper checks it holds them), and nothing is loaded.
    assert computed(plan) == {
        leader.engine_id: (0, 14),
        follower.engine_id: (12, 2),
        other.engine_id: (12, 2),
    }
    assert not plan.loads
    assert sorted(plan.prefixes.values()) == [(leader.slot, 12)] * 2
    assert [plan.requests[row] for row in sorted(plan.prefixes)] == [follower, other]
    assert cache.hit_tokens == 24 and cache.queried_tokens == 14 * 3
    assert {engine_id for engine_id, chunk in out if chunk.token_ids} == {
        leader.engine_id,
        follower.engine_id,
        other.engine_id,
    }
    assert scheduler._shared is not None and len(scheduler._shared) == 0
    # They go on as any request: the next step decodes the three.
    second, _ = step(scheduler, store)
    assert computed(second) == {r.engine_id: (14, 1) for r in (leader, follower, other)}
    assert not second.prefixes


def test_followers_join_as_far_as_the_budget_and_the_free_slots_go() -> None:
    # 16 tokens: the leader's 14 leave room for one follower's 2; the other waits for the
    # cache as before, and is released once the leader's chunk has covered the share.
    scheduler, _, store = make_scheduler(borrow=True)
    leader, follower, other = request(30, 31), request(40, 41), request(50, 51)
    for req in (leader, follower, other):
        assert scheduler.add_request(req) is None
    first, _ = step(scheduler, store, budget=16)
    assert computed(first) == {leader.engine_id: (0, 14), follower.engine_id: (12, 2)}
    second, _ = step(scheduler, store)
    assert computed(second)[other.engine_id] == (12, 2)
    assert not second.prefixes and len(second.loads) == 1  # from the cache, as before
    # Two slots: the leader's and one follower's.
    scheduler, _, store = make_scheduler(max_slots=2, borrow=True)
    leader, follower, other = request(30, 31), request(40, 41), request(50, 51)
    for req in (leader, follower, other):
        assert scheduler.add_request(req) is None
    first, _ = step(scheduler, store)
    assert set(computed(first)) == {leader.engine_id, follower.engine_id}
    assert other.held


def test_a_leader_whose_chunk_stops_short_of_the_share_is_not_joined() -> None:
    # A 4-token budget: no step has room past the leader's chunk; the follower is released
    # once the leader's chunks have covered the share, as without borrowing.
    scheduler, _, store = make_scheduler(borrow=True)
    leader, follower = request(30, 31), request(40, 41)
    assert scheduler.add_request(leader) is None and scheduler.add_request(follower) is None
    steps = [step(scheduler, store, budget=4)[0] for _ in range(4)]
    assert [set(computed(s)) for s in steps[:3]] == [{leader.engine_id}] * 3
    assert computed(steps[3])[follower.engine_id] == (12, 2)
    assert not any(s.prefixes for s in steps)


def test_a_share_shorter_than_a_block_past_the_cache_is_not_waited_for() -> None:
    scheduler, _, store = make_scheduler()
    earlier = request(30, 31)  # alone: it caches the 3 shared blocks
    assert scheduler.add_request(earlier) is None
    step(scheduler, store)
    scheduler.finish_requests([earlier.engine_id], RequestStatus.FINISHED_CANCELLED)
    # Both find 12 tokens cached; past them they share 2 tokens, less than a block.
    a, b = request(30, 31, 32, 33), request(30, 31, 40, 41)
    assert scheduler.add_request(a) is None and scheduler.add_request(b) is None
    plan, _ = step(scheduler, store)
    assert computed(plan) == {a.engine_id: (12, 4), b.engine_id: (12, 4)}


def test_a_lower_priority_leader_is_not_waited_for() -> None:
    scheduler, _, store = make_scheduler()
    low, high = request(30, 31, priority=Priority.LOW), request(40, 41, priority=Priority.HIGH)
    assert scheduler.add_request(low) is None and scheduler.add_request(high) is None
    plan, _ = step(scheduler, store)
    assert set(computed(plan)) == {low.engine_id, high.engine_id}


def test_a_cancelled_leader_releases_its_followers_to_compute_everything() -> None:
    scheduler, cache, store = make_scheduler(max_slots=1)
    busy = request()
    busy.tokens[:12] = range(70, 82)  # shares nothing; holds the only slot, so the leader waits
    assert scheduler.add_request(busy) is None
    step(scheduler, store)
    leader, follower = request(30, 31), request(40, 41)
    assert scheduler.add_request(leader) is None and scheduler.add_request(follower) is None
    scheduler.finish_requests([leader.engine_id], RequestStatus.FINISHED_CANCELLED)
    scheduler.finish_requests([busy.engine_id], RequestStatus.FINISHED_CANCELLED)
    plan, _ = step(scheduler, store)
    assert computed(plan) == {follower.engine_id: (0, 14)}
    assert all(refs == 0 for refs in cache._refs)


def test_a_follower_is_released_once_the_leaders_chunk_covers_the_share() -> None:
    # A 4-token budget: the leader's prompt takes 4 steps; the follower joins after the third.
    scheduler, _, store = make_scheduler()
    leader, follower = request(30, 31), request(40, 41)
    assert scheduler.add_request(leader) is None and scheduler.add_request(follower) is None
    steps = [computed(step(scheduler, store, budget=4)[0]) for _ in range(4)]
    assert [set(s) for s in steps[:3]] == [{leader.engine_id}] * 3
    assert steps[3][follower.engine_id] == (12, 2)


def test_held_requests_can_be_cancelled_and_leave_nothing_behind() -> None:
    scheduler, cache, store = make_scheduler()
    leader, follower = request(30, 31), request(40, 41)
    assert scheduler.add_request(leader) is None and scheduler.add_request(follower) is None
    scheduler.finish_requests([follower.engine_id], RequestStatus.FINISHED_CANCELLED)
    assert follower.status == RequestStatus.FINISHED_CANCELLED
    assert scheduler.num_waiting == 1
    first, _ = step(scheduler, store)
    second, _ = step(scheduler, store)
    assert set(computed(first)) == set(computed(second)) == {leader.engine_id}
    scheduler.finish_requests([leader.engine_id], RequestStatus.FINISHED_CANCELLED)
    assert not scheduler.has_unfinished()
    assert all(refs == 0 for refs in cache._refs)


def test_a_follower_waits_no_longer_than_the_share_where_the_pool_cannot_keep_it() -> None:
    # A pool of 2 blocks holds 8 of the 12 shared tokens: the follower is released once the
    # leader's chunks pass the share (after the third 4-token step), not when its prompt ends.
    scheduler, _, store = make_scheduler(num_blocks=2)
    leader, follower = request(30, 31, 32, 33, 34, 35), request(40, 41)
    assert scheduler.add_request(leader) is None and scheduler.add_request(follower) is None
    steps = [computed(step(scheduler, store, budget=4)[0]) for _ in range(3)]
    assert steps == [{leader.engine_id: (start, 4)} for start in (0, 4, 8)]
    assert scheduler.num_waiting == 1  # still held
    scheduler.release_held([])
    assert scheduler._shared is not None and len(scheduler._shared) == 0
    assert len(follower.prefix_blocks) == 2  # what the pool kept: it computes from 8


async def test_a_held_request_is_not_shed_while_its_leader_computes_the_share() -> None:
    # Prompt chunks take 40 ms and the leader's 192-token prompt 3 of them under a 64-token
    # budget; the bound on waiting for a slot is 0.05 s. The follower waits ~120 ms for the
    # shared 128 tokens: held, it is being served, not queued, and gets its answer.
    backend = HashKV(slots=2, delay=0.04)
    limits = EngineLimits(2, 64, 8, CONTEXT, 0.1, 1 << 20)
    engine = DecoderEngine("held", backend, Codec(), limits, [HASH_EOS])  # type: ignore[arg-type]
    engine.start()
    try:
        shared = [3 + i % 30 for i in range(128)]
        leader, follower = [*shared, *(3 + i * 7 % 37 for i in range(64))], [*shared, 5, 6, 7]
        answers = await asyncio.gather(ask(engine, leader, 4), ask(engine, follower, 4))
        assert answers == [reference(leader, 4), reference(follower, 4)]
        assert engine.prefix_cache is not None and engine.prefix_cache.hit_tokens >= 128
    finally:
        engine.stop()

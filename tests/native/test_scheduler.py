from __future__ import annotations

import random

import numpy as np
import pytest

from loadtest.benchmarks.native_reference import ReferenceScheduler
from router import _native


def make_scheduler(
    max_slots: int = 4, token_budget: int = 16, max_waiting: int = 8, max_context: int = 128
) -> _native.Scheduler:
    return _native.Scheduler(
        max_slots=max_slots,
        token_budget=token_budget,
        max_waiting=max_waiting,
        max_context=max_context,
    )


def rows(out: _native.SchedulerOutput) -> list[tuple[int, int, int, int, bool]]:
    """(request_id, slot, start, count, sample) per row, in output order."""
    return list(
        zip(
            out.request_ids.tolist(),
            out.slots.tolist(),
            out.starts.tolist(),
            out.counts.tolist(),
            out.sample.tolist(),
            strict=True,
        )
    )


def sampled(out: _native.SchedulerOutput) -> list[int]:
    return out.request_ids[out.sample].tolist()


def test_output_arrays_have_documented_dtypes() -> None:
    sched = make_scheduler()
    sched.add_request(1, num_prompt_tokens=3, max_new_tokens=2)
    out = sched.schedule()
    assert out.request_ids.dtype == np.int64
    assert out.slots.dtype == np.int32
    assert out.starts.dtype == np.int32
    assert out.counts.dtype == np.int32
    assert out.sample.dtype == np.bool_
    assert out.preempted.dtype == np.int64
    assert len(out) == 1


def test_prompt_is_prefilled_then_decoded_one_token_per_step() -> None:
    sched = make_scheduler(token_budget=16)
    sched.add_request(7, num_prompt_tokens=5, max_new_tokens=3)
    assert rows(sched.schedule()) == [(7, 0, 0, 5, True)]
    # Waiting for its sampled token: nothing to do until append_tokens.
    assert len(sched.schedule()) == 0
    sched.append_tokens([7])
    assert rows(sched.schedule()) == [(7, 0, 5, 1, True)]
    sched.append_tokens(np.array([7]))
    assert rows(sched.schedule()) == [(7, 0, 6, 1, True)]
    sched.append_tokens([7])
    # prompt + max_new_tokens reached: nothing more to compute, only finish.
    assert len(sched.schedule()) == 0
    assert sched.has_unfinished()
    sched.finish_requests([7])
    assert not sched.has_unfinished()
    assert sched.num_free_slots == 4


def test_long_prompt_is_chunked_across_steps_within_budget() -> None:
    sched = make_scheduler(token_budget=8)
    sched.add_request(1, num_prompt_tokens=20, max_new_tokens=4)
    assert rows(sched.schedule()) == [(1, 0, 0, 8, False)]
    assert rows(sched.schedule()) == [(1, 0, 8, 8, False)]
    assert rows(sched.schedule()) == [(1, 0, 16, 4, True)]


def test_budget_is_respected_and_decodes_come_before_prefill() -> None:
    sched = make_scheduler(max_slots=4, token_budget=10)
    for rid in (1, 2):
        sched.add_request(rid, num_prompt_tokens=3, max_new_tokens=10)
    sched.schedule()
    sched.append_tokens([1, 2])
    sched.add_request(3, num_prompt_tokens=30, max_new_tokens=10)

    out = sched.schedule()
    assert rows(out) == [(1, 0, 3, 1, True), (2, 1, 3, 1, True), (3, 2, 0, 8, False)]
    assert int(out.counts.sum()) == 10


def test_decodes_ordered_by_priority_and_budget_goes_to_the_most_urgent() -> None:
    sched = make_scheduler(max_slots=4, token_budget=16)
    sched.add_request(1, num_prompt_tokens=2, max_new_tokens=5, priority=0)
    sched.add_request(2, num_prompt_tokens=2, max_new_tokens=5, priority=5)
    sched.add_request(3, num_prompt_tokens=2, max_new_tokens=5, priority=1)
    assert sched.schedule().request_ids.tolist() == [2, 3, 1]
    sched.append_tokens([1, 2, 3])
    assert sched.schedule().request_ids.tolist() == [2, 3, 1]

    tight = make_scheduler(max_slots=4, token_budget=4)
    for rid, prio in ((1, 0), (2, 3)):
        tight.add_request(rid, num_prompt_tokens=2, max_new_tokens=5, priority=prio)
    tight.schedule()
    tight.append_tokens([1, 2])
    tight.add_request(3, num_prompt_tokens=2, max_new_tokens=5, priority=9)
    # Running decodes first (2 then 1); the newcomer gets the remaining 2 tokens.
    assert rows(tight.schedule()) == [(2, 0, 2, 1, True), (1, 1, 2, 1, True), (3, 2, 0, 2, True)]

    starved = make_scheduler(max_slots=4, token_budget=1)
    for rid, prio in ((1, 0), (2, 3)):
        starved.add_request(rid, num_prompt_tokens=1, max_new_tokens=5, priority=prio)
    assert starved.schedule().request_ids.tolist() == [2]
    assert starved.schedule().request_ids.tolist() == [1]
    starved.append_tokens([1, 2])
    assert starved.schedule().request_ids.tolist() == [2]


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    sched = make_scheduler(max_slots=2, token_budget=64)
    sched.add_request(1, num_prompt_tokens=4, max_new_tokens=4, priority=0)
    sched.add_request(2, num_prompt_tokens=4, max_new_tokens=4, priority=2)
    sched.add_request(3, num_prompt_tokens=4, max_new_tokens=4, priority=2)
    out = sched.schedule()
    assert out.request_ids.tolist() == [2, 3]
    assert sched.num_waiting == 1 and sched.num_running == 2 and sched.num_free_slots == 0


def test_finish_frees_the_slot_for_the_very_next_step() -> None:
    sched = make_scheduler(max_slots=1, token_budget=64)
    sched.add_request(1, num_prompt_tokens=4, max_new_tokens=4)
    sched.add_request(2, num_prompt_tokens=6, max_new_tokens=4)
    assert rows(sched.schedule()) == [(1, 0, 0, 4, True)]
    sched.finish_requests([1, 999])  # unknown ids are ignored
    assert rows(sched.schedule()) == [(2, 0, 0, 6, True)]


def test_finish_removes_waiting_requests_too() -> None:
    sched = make_scheduler(max_slots=1)
    sched.add_request(1, num_prompt_tokens=4, max_new_tokens=4)
    sched.add_request(2, num_prompt_tokens=4, max_new_tokens=4)
    sched.finish_requests(np.array([2], dtype=np.int64))
    assert sched.num_waiting == 1
    sched.schedule()
    sched.finish_requests([1])
    assert not sched.has_unfinished()
    assert len(sched.schedule()) == 0


def test_slots_are_distinct_and_reused() -> None:
    sched = make_scheduler(max_slots=3, token_budget=64)
    for rid in range(3):
        sched.add_request(rid, num_prompt_tokens=2, max_new_tokens=2)
    out = sched.schedule()
    assert sorted(out.slots.tolist()) == [0, 1, 2]
    freed = int(out.slots[out.request_ids == 1][0])
    sched.finish_requests([1])
    sched.add_request(10, num_prompt_tokens=2, max_new_tokens=2)
    out = sched.schedule()
    assert rows(out)[-1] == (10, freed, 0, 2, True)


def test_a_new_request_takes_the_lowest_free_slot_whatever_the_order_they_were_freed() -> None:
    """A batched decode spans slots 0..highest in use: a lone stream must not sit in slot 15."""
    sched = make_scheduler(max_slots=4, token_budget=64)
    for rid in range(4):
        sched.add_request(rid, num_prompt_tokens=2, max_new_tokens=2)
    out = sched.schedule()
    slot_of = dict(zip(out.request_ids.tolist(), out.slots.tolist(), strict=True))
    for rid in sorted(slot_of, key=slot_of.__getitem__):  # freed lowest first, highest last
        sched.finish_requests([rid])
    sched.add_request(10, num_prompt_tokens=2, max_new_tokens=2)
    sched.add_request(11, num_prompt_tokens=2, max_new_tokens=2)
    assert sched.schedule().slots.tolist() == [0, 1]


def test_higher_priority_preempts_lowest_priority_latest_arrival_with_recompute() -> None:
    sched = make_scheduler(max_slots=2, token_budget=64)
    sched.add_request(1, num_prompt_tokens=4, max_new_tokens=8, priority=1)
    sched.add_request(2, num_prompt_tokens=4, max_new_tokens=8, priority=1)
    sched.schedule()
    sched.append_tokens([1, 2])
    sched.add_request(3, num_prompt_tokens=5, max_new_tokens=8, priority=5)

    out = sched.schedule()
    # Same priority: the later arrival (2) is the victim; its decode row is withdrawn.
    assert out.preempted.tolist() == [2]
    assert rows(out) == [(1, 0, 4, 1, True), (3, 1, 0, 5, True)]
    assert sched.num_waiting == 1 and sched.num_free_slots == 0

    # Once a slot frees up, the victim recomputes its whole history (4 + 1 tokens).
    sched.finish_requests([3])
    sched.append_tokens([1])
    out = sched.schedule()
    assert rows(out) == [(1, 0, 5, 1, True), (2, 1, 0, 5, True)]
    assert out.preempted.size == 0


def test_a_cached_prefix_starts_the_first_row_past_it_and_preemption_recomputes_all() -> None:
    sched = make_scheduler(max_slots=1, token_budget=8)
    sched.add_request(1, num_prompt_tokens=20, max_new_tokens=4, num_cached=16)
    out = sched.schedule()
    assert rows(out) == [(1, 0, 16, 4, True)]  # 4 tokens left to compute, within the budget
    sched.append_tokens([1])
    sched.add_request(2, num_prompt_tokens=4, max_new_tokens=4, priority=1)
    out = sched.schedule()
    assert out.preempted.tolist() == [1]
    sched.finish_requests([2])
    out = sched.schedule()
    # Its slot was given away: the whole history (20 + 1 tokens) again, chunked by the budget.
    assert rows(out) == [(1, 0, 0, 8, False)]


@pytest.mark.parametrize("cached", [-1, 4, 5])
def test_a_cached_prefix_leaves_at_least_one_prompt_token(cached: int) -> None:
    sched = make_scheduler()
    with pytest.raises(ValueError, match=f"num_cached={cached} must be in 0..3"):
        sched.add_request(1, num_prompt_tokens=4, max_new_tokens=4, num_cached=cached)
    assert sched.num_waiting == 0


def test_a_step_budget_lowers_the_token_budget_for_one_step_only() -> None:
    sched = make_scheduler(max_slots=2, token_budget=16)
    sched.add_request(1, num_prompt_tokens=4, max_new_tokens=8)
    sched.schedule()
    sched.append_tokens([1])
    sched.add_request(2, num_prompt_tokens=40, max_new_tokens=8)
    # The decode row first, then what is left of a 6-token step for the new prompt.
    assert rows(sched.schedule(budget=6)) == [(1, 0, 4, 1, True), (2, 1, 0, 5, False)]
    sched.append_tokens([1])
    assert rows(sched.schedule()) == [(1, 0, 5, 1, True), (2, 1, 5, 15, False)]  # 0: all 16
    sched.append_tokens([1])
    assert rows(sched.schedule(budget=100)) == [(1, 0, 6, 1, True), (2, 1, 20, 15, False)]


def test_equal_priority_never_preempts() -> None:
    sched = make_scheduler(max_slots=1, token_budget=64)
    sched.add_request(1, num_prompt_tokens=4, max_new_tokens=8, priority=3)
    sched.schedule()
    sched.add_request(2, num_prompt_tokens=4, max_new_tokens=8, priority=3)
    sched.append_tokens([1])
    out = sched.schedule()
    assert out.preempted.size == 0
    assert out.request_ids.tolist() == [1]


def test_full_waiting_queue_sheds_load() -> None:
    sched = make_scheduler(max_waiting=2)
    assert sched.add_request(1, 4, 4)
    assert sched.add_request(2, 4, 4)
    assert not sched.add_request(3, 4, 4)
    assert sched.num_waiting == 2
    sched.schedule()  # admits both: the queue has room again
    assert sched.add_request(3, 4, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 4, 4), "duplicate"),
        ((2, 0, 4), "num_prompt_tokens=0"),
        ((2, 4, 0), "max_new_tokens=0"),
        ((2, 100, 29), "context limit of 128"),
    ],
)
def test_add_request_rejects_bad_requests(args: tuple[int, int, int], message: str) -> None:
    sched = make_scheduler(max_context=128)
    sched.add_request(1, 4, 4)
    with pytest.raises(ValueError, match=message):
        sched.add_request(*args)
    assert sched.num_waiting == 1


def test_append_beyond_max_new_tokens_is_rejected_without_partial_update() -> None:
    sched = make_scheduler()
    sched.add_request(1, num_prompt_tokens=2, max_new_tokens=1)
    sched.add_request(2, num_prompt_tokens=2, max_new_tokens=5)
    sched.schedule()
    with pytest.raises(ValueError, match="request 1"):
        sched.append_tokens([2, 1, 1])
    sched.append_tokens([2])  # 2 was not advanced by the failed call
    assert rows(sched.schedule()) == [(2, 1, 2, 1, True)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_slots": 0},
        {"token_budget": 0},
        {"max_waiting": -1},
        {"max_context": 1},
    ],
)
def test_constructor_rejects_bad_sizes(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_scheduler(**kwargs)


def test_properties() -> None:
    sched = make_scheduler(max_slots=3)
    assert sched.max_slots == 3
    assert (sched.num_waiting, sched.num_running, sched.num_free_slots) == (0, 0, 3)
    assert not sched.has_unfinished()


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_scheduler_on_random_workloads(seed: int) -> None:
    rnd = random.Random(seed)
    config = {
        "max_slots": rnd.randint(1, 6),
        "token_budget": rnd.randint(1, 40),
        "max_waiting": rnd.randint(1, 10),
        "max_context": 64,
    }
    native = make_scheduler(**config)
    ref = ReferenceScheduler(**config)
    next_id = 0
    for _ in range(150):
        for _ in range(rnd.randint(0, 3)):
            prompt = rnd.randint(1, 40)
            args = (next_id, prompt, rnd.randint(1, 64 - prompt), rnd.randint(0, 3))
            assert native.add_request(*args) == ref.add_request(*args)
            next_id += 1
        out, want = native.schedule(), ref.schedule()
        assert out.request_ids.tolist() == want.request_ids
        assert out.slots.tolist() == want.slots
        assert out.starts.tolist() == want.starts
        assert out.counts.tolist() == want.counts
        assert out.sample.tolist() == want.sample
        assert out.preempted.tolist() == want.preempted
        assert int(out.counts.sum()) <= config["token_budget"]
        assert len(set(out.slots.tolist())) == len(out)

        # A model would produce one token per sampled row; some requests stop.
        produced = sampled(out)
        done = [
            rid
            for rid in produced
            if ref.seqs[rid].num_tokens + 1 >= ref.seqs[rid].max_total or rnd.random() < 0.1
        ]
        native.append_tokens(produced)
        ref.append_tokens(produced)
        if rnd.random() < 0.05 and ref.seqs:
            done.append(rnd.choice(list(ref.seqs)))  # a cancellation, maybe while waiting
        native.finish_requests(done)
        ref.finish_requests(done)
        assert native.num_waiting == ref.num_waiting
        assert native.num_running == ref.num_running
        assert native.num_free_slots == ref.num_free_slots

"""The Scheduler driven by hand: plans from the native core, outputs built by the test (vLLM's
scheduler tests run so, without a model). Checks what each step means for its requests."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from backends.base import SamplingParams
from router.errors import Internal, ResourceExhausted
from router.scheduler.generation import Chunk, EngineLimits
from router.scheduler.prefix_cache import PrefixCache
from router.scheduler.request import Request, RequestStatus
from router.scheduler.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from tests.unit.router.scheduler.test_engine_fill import Codec
from tests.unit.router.scheduler.test_prefix_cache import TokenStore

EOS = 2
BAD = 99
"""A token the decoder cannot decode."""
_ids = itertools.count(1)


class Decoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if BAD in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return "".join(chr(ord("a") + i % 26) for i in ids)


def make_request(n_prompt: int = 3, **params: object) -> Request:
    engine_id = next(_ids)
    return Request(
        request_id=f"r{engine_id}",
        engine_id=engine_id,
        prompt_ids=list(range(10, 10 + n_prompt)),
        params=SamplingParams(**{"max_tokens": 16, **params}),  # type: ignore[arg-type]
    )


def make_scheduler(max_slots: int = 4, max_waiting: int = 4) -> Scheduler:
    limits = EngineLimits(max_slots, token_budget=64, max_waiting=max_waiting, max_context=128)
    return Scheduler("test", limits, Decoder(), stop_ids=[EOS])


def sampled(
    scheduler: Scheduler, tokens: dict[int, int] | None = None, **errors: str
) -> tuple[SchedulerOutput, list[tuple[int, Chunk]]]:
    """One step: schedule, then the output the test chose, by request id (not row)."""
    step = scheduler.schedule()
    rows = {req.engine_id: row for row, req in enumerate(step.requests)}
    result = RunnerOutput(
        tokens={rows[i]: t for i, t in (tokens or {}).items()},
        errors={rows[int(i.removeprefix("r"))]: e for i, e in errors.items()},
    )
    return step, scheduler.update_from_output(step, result)


def test_a_new_request_is_prefilled_then_decoded_one_token_a_step() -> None:
    scheduler = make_scheduler()
    req = make_request(n_prompt=5, max_tokens=4)
    assert scheduler.add_request(req) is None
    step = scheduler.schedule()
    assert step.requests == [req] and req.status == RequestStatus.RUNNING and req.slot == 0
    assert (int(step.plan.starts[0]), int(step.plan.counts[0]), bool(step.plan.sample[0])) == (
        0,
        5,
        True,
    )
    out = scheduler.update_from_output(step, RunnerOutput(tokens={0: 3}))
    assert [(i, c.token_ids, c.text, c.status) for i, c in out] == [
        (req.engine_id, (3,), "d", RequestStatus.RUNNING)
    ]
    step, _ = sampled(scheduler, {req.engine_id: 4})
    assert (int(step.plan.starts[0]), int(step.plan.counts[0])) == (5, 1)  # the sampled token
    assert req.output_ids.tolist() == [3, 4]


def test_num_decoding_counts_what_takes_one_token_a_step_not_prompts_in_prefill() -> None:
    """What step pacing subtracts from a step's budget before its prefill: a request still in
    its prompt is running but takes no decode row."""
    scheduler = make_scheduler()
    decoding, waiting = make_request(n_prompt=4), make_request(n_prompt=4)
    scheduler.add_request(decoding)
    assert scheduler.num_decoding == 0
    sampled(scheduler, {decoding.engine_id: 5})  # its whole prompt, then its first token
    assert scheduler.num_decoding == 1
    scheduler.add_request(waiting)
    step = scheduler.schedule(budget=3)  # 1 decode row + 2 of the new prompt's 4 tokens
    assert scheduler.num_running == 2 and scheduler.num_decoding == 1
    rows = {req.engine_id: row for row, req in enumerate(step.requests)}
    scheduler.update_from_output(step, RunnerOutput(tokens={rows[decoding.engine_id]: 6}))
    assert scheduler.num_decoding == 1  # the new one is still in its prompt
    sampled(scheduler, {decoding.engine_id: 7, waiting.engine_id: 8})
    assert scheduler.num_decoding == 2
    scheduler.finish_requests([decoding.engine_id], RequestStatus.FINISHED_CANCELLED)
    assert scheduler.num_decoding == 1


def test_a_bursts_first_finishers_are_fresh_until_a_later_prompt_comes() -> None:
    """StepPacer.budget gives a step the whole budget while every decoding stream has only its
    first token (a burst's first finishers, the rest of the burst still in its prompts), but
    not for a prompt queued after they got their slots."""
    scheduler = make_scheduler(max_slots=4)
    first, second, late_in_burst = (make_request(n_prompt=4) for _ in range(3))
    for req in (first, second, late_in_burst):
        assert scheduler.add_request(req) is None
    step = scheduler.schedule(budget=8)  # first and second only: the third's prompt waits
    rows = {req.engine_id: row for row, req in enumerate(step.requests)}
    assert set(rows) == {first.engine_id, second.engine_id}
    tokens = {rows[first.engine_id]: 5, rows[second.engine_id]: 5}
    scheduler.update_from_output(step, RunnerOutput(tokens=tokens))
    assert scheduler.decoding() == (2, 2)  # the third came with them
    newcomer = make_request(n_prompt=4)
    assert scheduler.add_request(newcomer) is None
    assert scheduler.decoding() == (2, 0)  # the newcomer did not
    scheduler.finish_requests([newcomer.engine_id], RequestStatus.FINISHED_CANCELLED)
    assert scheduler.decoding() == (2, 2)


def test_max_tokens_ends_the_request_and_its_slot_is_freed_next_step() -> None:
    scheduler = make_scheduler()
    req = make_request(max_tokens=2)
    scheduler.add_request(req)
    sampled(scheduler, {req.engine_id: 5})
    _, out = sampled(scheduler, {req.engine_id: 6})
    assert out[-1][1].status == RequestStatus.FINISHED_LENGTH
    assert req.engine_id not in scheduler.requests and not scheduler.has_unfinished()
    assert scheduler.take_freed_slots() == [0]


@pytest.mark.parametrize(
    ("params", "token", "status", "text"),
    [
        ({}, EOS, RequestStatus.FINISHED_STOPPED, ""),
        ({"ignore_eos": True}, EOS, RequestStatus.RUNNING, "c"),
        ({"stop_token_ids": (7,)}, 7, RequestStatus.FINISHED_STOPPED, ""),
        ({"stop": ("h",)}, 7, RequestStatus.FINISHED_STOPPED, ""),  # 7 decodes to "h"
    ],
)
def test_stop_tokens_and_strings(
    params: dict[str, object], token: int, status: RequestStatus, text: str
) -> None:
    scheduler = make_scheduler()
    req = make_request(max_tokens=10, **params)
    scheduler.add_request(req)
    _, out = sampled(scheduler, {req.engine_id: token})
    assert out[0][1].status == status
    assert out[0][1].text == text  # neither an end token nor a stop string is text


def test_a_failed_row_fails_alone() -> None:
    scheduler = make_scheduler()
    a, b = make_request(max_tokens=5), make_request(max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)
    _, out = sampled(scheduler, {a.engine_id: 4}, **{f"r{b.engine_id}": "decode failed"})
    by_id = dict(out)
    assert by_id[a.engine_id].status == RequestStatus.RUNNING
    assert isinstance(by_id[b.engine_id].error, Internal)
    assert str(by_id[b.engine_id].error) == "decode failed"
    assert set(scheduler.requests) == {a.engine_id}
    step, _ = sampled(scheduler, {a.engine_id: 5})
    assert step.requests == [a]


def test_a_row_that_cannot_be_detokenized_fails_alone() -> None:
    scheduler = make_scheduler()
    a, b = make_request(max_tokens=5), make_request(max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)
    _, out = sampled(scheduler, {a.engine_id: 4, b.engine_id: BAD})
    by_id = dict(out)
    assert by_id[a.engine_id].text == "e"
    assert isinstance(by_id[b.engine_id].error, Internal)
    assert set(scheduler.requests) == {a.engine_id}


def test_a_full_queue_refuses_with_resource_exhausted() -> None:
    scheduler = make_scheduler(max_slots=1, max_waiting=0)
    assert scheduler.add_request(make_request()) is None
    error = scheduler.add_request(make_request())
    assert isinstance(error, ResourceExhausted) and "queue is full" in str(error)


def test_a_cancelled_request_frees_its_slot_for_the_next_one() -> None:
    scheduler = make_scheduler(max_slots=1)
    first, second = make_request(max_tokens=50), make_request(max_tokens=50)
    scheduler.add_request(first)
    scheduler.add_request(second)
    step, _ = sampled(scheduler, {first.engine_id: 4})
    assert step.requests == [first]  # one slot: the second waits
    scheduler.finish_requests([first.engine_id], RequestStatus.FINISHED_CANCELLED)
    assert first.status == RequestStatus.FINISHED_CANCELLED
    step = scheduler.schedule()
    assert step.requests == [second] and second.slot == 0
    assert step.freed_slots == [0]  # the runner releases it before prefilling the second


def cached_scheduler() -> tuple[Scheduler, PrefixCache, TokenStore]:
    """One slot, a prefix cache of 8 blocks of 4 tokens over a TokenStore."""
    store = TokenStore()
    store.open_pool(8, 4)
    cache = PrefixCache(store, num_blocks=8, block_size=4)
    limits = EngineLimits(1, token_budget=64, max_waiting=4, max_context=128)
    scheduler = Scheduler("test", limits, Decoder(), stop_ids=[EOS], prefix_cache=cache)
    return scheduler, cache, store


def test_a_cached_prefix_is_loaded_into_the_slot_and_its_blocks_unpinned_on_every_path() -> None:
    scheduler, cache, store = cached_scheduler()
    first = make_request(n_prompt=11)
    assert scheduler.add_request(first) is None
    step = scheduler.schedule()
    assert step.loads == [] and step.plan.starts.tolist() == [0]
    store.compute(step.plan.slots[0], first.tokens[:11])  # what the runner's prefill did
    scheduler.update_from_output(step, RunnerOutput(tokens={0: 5}))
    assert cache.cached_blocks == 2  # its prompt's whole blocks, saved after the prefill

    second = make_request(n_prompt=11)  # the same prompt ids
    waiting = make_request(n_prompt=11)
    assert scheduler.add_request(second) is None and scheduler.add_request(waiting) is None
    scheduler.finish_requests([first.engine_id], RequestStatus.FINISHED_CANCELLED)
    step = scheduler.schedule()
    # Admitted with 8 of its 11 prompt tokens cached: the runner loads 2 blocks, then computes 3.
    assert step.requests == [second] and [(r, len(b)) for r, b in step.loads] == [(0, 2)]
    assert step.plan.starts.tolist() == [8] and step.plan.counts.tolist() == [3]
    assert second.prefix_blocks == []  # the blocks are the runner's to unpin now
    cache.release(step.loads[0][1])
    # The waiting request still pins its blocks; cancelling it unpins them, so all can go.
    assert waiting.prefix_blocks
    scheduler.finish_requests([waiting.engine_id], RequestStatus.FINISHED_CANCELLED)
    assert waiting.prefix_blocks == []
    assert all(refs == 0 for refs in cache._refs)


def test_a_block_completed_by_a_one_token_prompt_chunk_is_cached() -> None:
    # Prompt rows of any length are prefills (the runner's routing), so a one-token chunk's
    # block is saved as well: a 7-token budget, then 1, over an 8-token prompt.
    scheduler, cache, store = cached_scheduler()
    req = make_request(n_prompt=8)
    assert scheduler.add_request(req) is None
    for budget, tokens in ((7, {}), (1, {0: 5})):
        step = scheduler.schedule(budget)
        start, count = int(step.plan.starts[0]), int(step.plan.counts[0])
        store.compute(step.plan.slots[0], req.tokens[: start + count])
        scheduler.update_from_output(step, RunnerOutput(tokens=tokens))
    assert (start, count) == (7, 1)
    assert cache.cached_blocks == 2


def finished(
    scheduler: Scheduler, store: TokenStore, req: Request, tokens: Iterator[int] | None = None
) -> None:
    """Run `req` alone until it ends (sampling `tokens`, else 5, 6, ...), as the runner would
    compute it."""
    assert scheduler.add_request(req) is None
    tokens = tokens or itertools.count(5)
    while req.engine_id in scheduler.requests:
        step = scheduler.schedule()
        end = int(step.plan.starts[0] + step.plan.counts[0])
        store.compute(step.plan.slots[0], req.tokens[:end])
        scheduler.update_from_output(step, RunnerOutput(tokens={0: next(tokens)}))


def test_a_finished_reply_is_computed_again_into_the_cache_for_the_next_turn() -> None:
    scheduler, cache, store = cached_scheduler()  # blocks of 4 tokens
    first = make_request(n_prompt=6, max_tokens=8)
    finished(scheduler, store, first)
    assert first.num_tokens == 14 and cache.cached_blocks == 1  # the prompt's whole block
    # From the block the prompt ends in (4..8, recomputed whole: its KV is then the prompt
    # graph's), to the end of the reply's last whole block, in chunks ending on block boundaries.
    chunks = []
    while (fill := scheduler.next_fill(4)) is not None:
        chunk, start, end = fill
        assert chunk.slot == 0 and (chunk.tokens == first.tokens[:14]).all()
        chunks.append((start, end))
        store.compute(chunk.slot, chunk.tokens[:end])  # ModelRunner.fill
        cache.save(chunk.slot, chunk.tokens, end)
    assert chunks == [(4, 8), (8, 12)] and scheduler.pending_fills == 0
    # The next turn (its prompt holds the whole reply, then more) finds 12 tokens cached.
    prompt = [*first.tokens[:14].tolist(), 30, 31]
    second = Request(
        request_id="next",
        engine_id=next(_ids),
        prompt_ids=prompt,
        params=SamplingParams(max_tokens=4),
    )
    assert scheduler.add_request(second) is None
    assert len(second.prefix_blocks) == 3


def test_where_decode_computes_as_prompts_do_a_reply_is_cached_as_it_ends() -> None:
    scheduler, cache, store = cached_scheduler()  # blocks of 4 tokens
    first = make_request(n_prompt=6, max_tokens=6)
    scheduler.decode_is_prefill = True
    finished(scheduler, store, first)
    # 12 tokens, the slot holding 11 (the last sampled one is never computed): the 2 whole
    # blocks of those cached when it ends, before any fill, so a next turn sent at once finds
    # them (a third block would hold a token the slot lacks: the store refuses it).
    assert first.num_tokens == 12 and cache.cached_blocks == 2
    assert scheduler.pending_fills == 1  # for where its text may tokenize differently


def test_a_reply_not_computed_again_by_the_next_plan_is_dropped_with_its_slot() -> None:
    scheduler, _, store = cached_scheduler()
    finished(scheduler, store, make_request(n_prompt=6, max_tokens=8))
    assert scheduler.pending_fills == 1
    assert scheduler.add_request(make_request(n_prompt=3)) is None
    step = scheduler.schedule()  # the slot goes to the new request
    assert step.freed_slots == [0] and step.plan.slots.tolist() == [0]
    assert scheduler.pending_fills == 0 and scheduler.next_fill(4) is None


def test_a_reply_is_kept_as_its_text_tokenizes_then_the_stop_token_that_ended_it() -> None:
    scheduler, _, store = cached_scheduler()
    scheduler._decoder = Codec()
    req = make_request(n_prompt=4, max_tokens=8)
    # f, then a and b (26 and 27 decode so), d, e, EOS
    finished(scheduler, store, req, iter([5, 26, 27, 29, 30, EOS]))
    fill = scheduler.next_fill(8)
    assert fill is not None
    # "fabde" comes back as f, ab, d, e (5, 28, 3, 4), then EOS: 4 + 5 tokens, one whole block.
    assert fill[0].tokens[4:].tolist() == [5, 28, 3, 4, EOS]
    assert fill[1:] == (4, 8) and scheduler.next_fill(8) is None


@pytest.mark.parametrize(
    ("params", "tokens", "kept"),
    [
        ({"stop": ["d"]}, [5, 26, 27, 6, 7, 29], [5, 28, 6, 7]),  # sent up to its stop string
        ({"stop_token_ids": [30]}, [5, 26, 27, 6, 7, 30], [5, 28, 6, 7]),  # its own: not sent
    ],
    ids=["stop-string", "callers-stop-token"],
)
def test_a_reply_is_kept_as_the_caller_got_it(
    params: dict[str, object], tokens: list[int], kept: list[int]
) -> None:
    scheduler, _, store = cached_scheduler()
    scheduler._decoder = Codec()
    req = make_request(n_prompt=4, max_tokens=8, **params)
    finished(scheduler, store, req, iter(tokens))
    fill = scheduler.next_fill(8)
    assert fill is not None and fill[0].tokens[4:].tolist() == kept


@pytest.mark.parametrize(
    ("n_prompt", "max_tokens", "cancel"),
    [(6, 8, True), (5, 2, False), (9, 2, False)],
    ids=["cancelled", "no-whole-block-past-the-prompt", "ending-in-the-prompts-last-block"],
)
def test_no_reply_is_kept_without_a_whole_block_past_the_prompts_whole_blocks(
    n_prompt: int, max_tokens: int, cancel: bool
) -> None:
    scheduler, _, store = cached_scheduler()
    req = make_request(n_prompt=n_prompt, max_tokens=max_tokens)
    if cancel:
        assert scheduler.add_request(req) is None
        step = scheduler.schedule()
        store.compute(step.plan.slots[0], req.tokens[:n_prompt])
        scheduler.update_from_output(step, RunnerOutput(tokens={0: 5}))
        scheduler.finish_requests([req.engine_id], RequestStatus.FINISHED_CANCELLED)
    else:
        finished(scheduler, store, req)
    assert scheduler.next_fill(4) is None and scheduler.pending_fills == 0

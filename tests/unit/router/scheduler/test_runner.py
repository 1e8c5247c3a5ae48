"""ModelRunner over a fake step engine: freed slots released first, generated-token rows decoded
in one batched call, prompt chunks prefilled (in one call where the backend batches them), and a
failure in prefill, decode or sampling kept to its row."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from backends.base import SamplingParams
from router.scheduler import runner as runner_module
from router.scheduler.generation import EngineLimits
from router.scheduler.request import Request
from router.scheduler.runner import ModelRunner
from router.scheduler.scheduler import Plan, Scheduler, SchedulerOutput

VOCAB = 16
_ids = itertools.count(1)


class StepEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.chunks: list[tuple[list[int], int]] = []
        """(token ids, start) of every prefill."""
        self.fail_decode_slot = -1

    def prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        self.calls.append(("prefill", slot))
        self.chunks.append((token_ids.tolist(), start))
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[5] = 9.0
        return logits

    def decode(self, slots: np.ndarray, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.calls.append(("decode", slots.tolist()))
        if self.fail_decode_slot in slots.tolist():
            raise RuntimeError("bad slot")
        logits = np.zeros((len(slots), VOCAB), dtype=np.float32)
        logits[:, 6] = 9.0
        return logits

    def release(self, slot: int) -> None:
        self.calls.append(("release", slot))


class Decoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(ids)


def started(n: int) -> tuple[Scheduler, ModelRunner, StepEngine, list[Request]]:
    """n requests past their prefill step, each in its own slot."""
    scheduler = Scheduler("t", EngineLimits(4, 64, 4, 64), Decoder(), stop_ids=[])
    engine = StepEngine()
    runner = ModelRunner("t", engine)  # type: ignore[arg-type]
    reqs = []
    for _ in range(n):
        i = next(_ids)
        req = Request(f"r{i}", i, [1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0))
        scheduler.add_request(req)
        reqs.append(req)
    step = scheduler.schedule()
    scheduler.update_from_output(step, runner.execute(step))
    engine.calls.clear()
    return scheduler, runner, engine, reqs


def test_prefill_then_one_batched_decode() -> None:
    scheduler, runner, engine, reqs = started(3)
    assert [r.output_ids.tolist() for r in reqs] == [[5]] * 3  # greedy on the prefill logits
    step = scheduler.schedule()
    result = runner.execute(step)
    assert engine.calls == [("decode", [0, 1, 2])]
    assert result.tokens == {0: 6, 1: 6, 2: 6} and not result.errors


def test_a_failing_decode_row_fails_alone() -> None:
    scheduler, runner, engine, _ = started(3)
    engine.fail_decode_slot = 1
    result = runner.execute(scheduler.schedule())
    assert result.errors == {1: "decode failed for this request"}
    assert result.tokens == {0: 6, 2: 6}


def test_a_failing_sampling_row_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, runner, _, reqs = started(3)
    real = runner_module.sample

    def sample(batch: list[Request], logits: list[np.ndarray]) -> list[int]:
        if reqs[2] in batch:
            raise ValueError("bad sampling parameters")
        return real(batch, logits)

    monkeypatch.setattr(runner_module, "sample", sample)
    result = runner.execute(scheduler.schedule())
    assert result.errors == {2: "sampling failed for this request"}
    assert result.tokens == {0: 6, 1: 6}


def test_freed_slots_are_released_before_the_step_runs() -> None:
    scheduler, runner, engine, reqs = started(2)
    scheduler.finish_requests([reqs[0].engine_id], reqs[0].status.FINISHED_CANCELLED)
    runner.execute(scheduler.schedule())
    assert engine.calls == [("release", 0), ("decode", [1])]


class BatchingStepEngine(StepEngine):
    """Also computes several prompts a call (backends.base.BatchedPrefill)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_prefill_slot = -1

    def prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        if slot == self.fail_prefill_slot:
            raise RuntimeError("bad prompt")
        return super().prefill(slot, token_ids, start)

    def prefill_batch(
        self, slots: list[int], chunks: list[np.ndarray], starts: list[int]
    ) -> np.ndarray:
        self.calls.append(("prefill_batch", (slots, [c.tolist() for c in chunks], starts)))
        if self.fail_prefill_slot in slots:
            raise RuntimeError("bad prompt")
        logits = np.zeros((len(slots), VOCAB), dtype=np.float32)
        logits[:, 7] = 9.0
        return logits


def admitted(engine: StepEngine, prompts: list[list[int]]) -> tuple[Scheduler, ModelRunner]:
    scheduler = Scheduler("t", EngineLimits(4, 64, 4, 64), Decoder(), stop_ids=[])
    runner = ModelRunner("t", engine)  # type: ignore[arg-type]
    for prompt in prompts:
        i = next(_ids)
        scheduler.add_request(
            Request(f"r{i}", i, prompt, SamplingParams(max_tokens=8, temperature=0.0))
        )
    return scheduler, runner


def test_the_prompts_of_a_step_are_one_call_where_the_backend_batches_them() -> None:
    engine = BatchingStepEngine()
    scheduler, runner = admitted(engine, [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    result = runner.execute(scheduler.schedule())
    assert engine.calls == [
        ("prefill_batch", ([0, 1, 2], [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [0, 0, 0]))
    ]
    assert result.tokens == {0: 7, 1: 7, 2: 7} and not result.errors


def test_a_failing_batched_prefill_is_retried_row_by_row_and_fails_one_row() -> None:
    engine = BatchingStepEngine()
    engine.fail_prefill_slot = 1
    scheduler, runner = admitted(engine, [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    result = runner.execute(scheduler.schedule())
    assert [c[0] for c in engine.calls] == ["prefill_batch", "prefill", "prefill"]
    assert result.errors == {1: "prefill failed for this request"}
    assert result.tokens == {0: 5, 2: 5}


def test_a_prompt_chunk_of_one_token_is_prefilled_not_decoded() -> None:
    # A 2-token budget leaves the 3-token prompt's last token to a chunk of its own.
    engine = StepEngine()
    scheduler, runner = admitted(engine, [[1, 2, 3]])
    first = scheduler.schedule(budget=2)
    scheduler.update_from_output(first, runner.execute(first))
    engine.calls.clear()
    second = scheduler.schedule()
    assert second.plan.counts.tolist() == [1] and second.plan.starts.tolist() == [2]
    result = runner.execute(second)
    assert engine.calls == [("prefill", 0)]  # the decode path would round it differently
    # ... and so would a one-row prefill call in the int4 graph: computed with the token
    # before it again (whose KV comes out the same).
    assert engine.chunks[-1] == ([2, 3], 1)
    assert result.tokens == {0: 5}


class MixedStepEngine(BatchingStepEngine):
    """A backend that computes decode rows and prompt chunks alike (OnnxDecoder with its
    prompts in the native kernels)."""

    mixed_steps = True


def _decoding_and_arriving(engine: StepEngine) -> tuple[ModelRunner, SchedulerOutput]:
    """One request decoding, a second arriving: the step that carries both."""
    scheduler, runner = admitted(engine, [[1, 2, 3]])
    first = scheduler.schedule()
    scheduler.update_from_output(first, runner.execute(first))
    i = next(_ids)
    scheduler.add_request(
        Request(f"r{i}", i, [4, 5], SamplingParams(max_tokens=8, temperature=0.0))
    )
    engine.calls.clear()
    return runner, scheduler.schedule()


def test_decode_rows_and_prompt_chunks_are_one_call_where_the_backend_computes_both() -> None:
    engine = MixedStepEngine()
    runner, step = _decoding_and_arriving(engine)
    result = runner.execute(step)
    # The decoding row's last token at its position, then the new prompt: one call, no
    # one-token widening (these kernels compute every token alike).
    assert engine.calls == [("prefill_batch", ([0, 1], [[5], [4, 5]], [3, 0]))]
    assert result.tokens == {0: 7, 1: 7} and not result.errors


def test_a_failing_mixed_step_runs_its_rows_apart() -> None:
    engine = MixedStepEngine()
    engine.fail_prefill_slot = 1
    runner, step = _decoding_and_arriving(engine)
    result = runner.execute(step)
    # The decode row in its own call; the prompt alone (its prefill fails again, by itself).
    assert [c[0] for c in engine.calls] == ["prefill_batch", "decode"]
    assert result.errors == {1: "prefill failed for this request"}
    assert result.tokens == {0: 6}


def test_decode_rows_stay_apart_where_the_backend_computes_them_differently() -> None:
    engine = BatchingStepEngine()
    runner, step = _decoding_and_arriving(engine)
    runner.execute(step)
    assert [c[0] for c in engine.calls] == ["decode", "prefill"]


def test_logits_rows_of_one_step_are_sampled_in_place_others_copied() -> None:
    """A decode step's rows in order are a view of its output (no 3 MB copy a step at 16
    rows); rows out of order, apart or of several arrays are stacked into a copy."""
    step = np.arange(5 * VOCAB, dtype=np.float32).reshape(5, VOCAB)
    block = runner_module._as_block([step[1], step[2], step[3]])
    assert np.shares_memory(block, step) and block.flags.c_contiguous
    assert np.array_equal(block, step[1:4])
    other = step.copy()
    for rows in ([step[2], step[1]], [step[0], step[2]], [step[0], other[1]]):
        block = runner_module._as_block(rows)
        assert not np.shares_memory(block, step) and np.array_equal(block, np.stack(rows))
    halves = step.astype(np.float64)  # not float32: converted
    block = runner_module._as_block([halves[0], halves[1]])
    assert block.dtype == np.float32 and np.array_equal(block, step[:2])


def test_plain_greedy_rows_take_the_native_samplers_tokens() -> None:
    """Greedy float32 rows with no penalty or grammar skip the native call: the same first
    largest logit, ties (+0 and -0 too) and infinities included; a NaN row, a penalty, a
    sampled row or other rows in the batch send it to the native sampler."""
    rng = np.random.default_rng(7)
    rows = [rng.standard_normal(VOCAB).astype(np.float32) for _ in range(6)]
    rows[1][[3, 9]] = 50.0  # a tie: the first
    rows[2][:] = 0.0
    rows[2][4] = -0.0  # +0 and -0 compare equal: the first of them
    rows[3][[2, 11]] = np.inf
    rows[4][:] = -np.inf
    rows[5][6] = np.float32(1e30)

    def reqs(**params: object) -> list[Request]:
        return [
            Request(f"r{i}", next(_ids), [1, 2, 3], SamplingParams(**params))  # type: ignore[arg-type]
            for i in range(len(rows))
        ]

    greedy = reqs(temperature=0.0)
    assert all(runner_module._plain_greedy(r) for r in greedy)
    native_calls = 0
    real = runner_module._native.sample

    def counted(*args: object, **kwargs: object) -> np.ndarray:
        nonlocal native_calls
        native_calls += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    runner_module._native.sample = counted  # type: ignore[assignment]
    try:
        fast = runner_module.sample(greedy, rows)
        assert native_calls == 0
        # A penalty the native sampler reads as none (1.0 in float32) sends the same rows there.
        penalised = reqs(temperature=0.0, repetition_penalty=1.0 + 1e-9)
        assert not runner_module._plain_greedy(penalised[0])
        native = runner_module.sample(penalised, rows)
        assert fast == native == [int(np.argmax(r)) for r in rows] and fast[1] == 3
        assert native_calls == 1
        nan = [*rows[:1], np.full(VOCAB, np.nan, np.float32)]
        runner_module.sample(reqs(temperature=0.0)[:2], nan)
        assert native_calls == 2
        mixed = reqs(temperature=0.0)[:1] + reqs(temperature=0.7, seed=1)[:1]
        runner_module.sample(mixed, rows[:2])
        assert native_calls == 3
        wide = [r.astype(np.float64) for r in rows[:2]]  # the native call rounds them to float32
        runner_module.sample(reqs(temperature=0.0)[:2], wide)
        assert native_calls == 4
    finally:
        runner_module._native.sample = real  # type: ignore[assignment]


class BorrowingStepEngine(MixedStepEngine):
    """Its prompt chunks may read a prefix from another slot (backends.base.PrefixBorrowing)."""

    borrows_prefixes = True

    def __init__(self) -> None:
        super().__init__()
        self.settled = 0

    def prefill_batch(
        self,
        slots: list[int],
        chunks: list[np.ndarray],
        starts: list[int],
        prefixes: list[tuple[int, int] | None] | None = None,
    ) -> np.ndarray:
        call = (slots, [c.tolist() for c in chunks], starts, prefixes)
        self.calls.append(("prefill_batch", call))
        if self.fail_prefill_slot in slots:
            raise RuntimeError("bad prompt")
        logits = np.zeros((len(slots), VOCAB), dtype=np.float32)
        logits[:, 7] = 9.0
        return logits

    def settle(self) -> None:
        self.settled += 1


def _leader_and_follower() -> SchedulerOutput:
    """A leader's 14-token prompt in slot 0 and a follower reading its first 12 there."""
    shared = list(range(1, 13))
    reqs = [
        Request(f"r{i}", i, [*shared, *tail], SamplingParams(max_tokens=4, temperature=0.0))
        for i, tail in ((next(_ids), [13, 14]), (next(_ids), [14, 15]))
    ]
    plan = Plan(
        request_ids=np.array([r.engine_id for r in reqs], np.int64),
        slots=np.array([0, 1], np.int32),
        starts=np.array([0, 12], np.int32),
        counts=np.array([14, 2], np.int32),
        sample=np.array([1, 1], np.uint8),
        preempted=np.array([], np.int64),
    )
    return SchedulerOutput(plan, reqs, prefixes={1: (0, 12)})


def test_a_chunk_reading_its_prefix_elsewhere_passes_it_and_is_settled_on_request() -> None:
    engine = BorrowingStepEngine()
    runner = ModelRunner("t", engine)  # type: ignore[arg-type]
    assert runner.borrows_prefixes
    result = runner.execute(_leader_and_follower())
    chunks = [[*range(1, 13), 13, 14], [14, 15]]
    assert engine.calls == [("prefill_batch", ([0, 1], chunks, [0, 12], [None, (0, 12)]))]
    assert result.tokens == {0: 7, 1: 7} and engine.settled == 0
    runner.settle()
    assert engine.settled == 1
    # Without a row reading one, the call is BatchedPrefill's own.
    engine.calls.clear()
    step = _leader_and_follower()
    runner.execute(SchedulerOutput(step.plan, step.requests))
    assert engine.calls == [("prefill_batch", ([0, 1], [chunks[0], [14, 15]], [0, 12], None))]


def test_a_follower_fails_with_the_leader_whose_prefix_it_reads() -> None:
    engine = BorrowingStepEngine()
    engine.fail_prefill_slot = 0
    runner = ModelRunner("t", engine)  # type: ignore[arg-type]
    result = runner.execute(_leader_and_follower())
    # The batch failed; row by row the leader fails, and the follower is not computed over a
    # prefix its slot 0 does not hold.
    assert [c[0] for c in engine.calls] == ["prefill_batch"]
    assert result.errors == {
        0: "prefill failed for this request",
        1: "prefill failed for this request",
    }


def test_a_follower_runs_alone_with_its_prefix_where_the_batch_fails() -> None:
    engine = BorrowingStepEngine()
    batches = engine.prefill_batch

    def only_one_row(slots: list[int], *args: object) -> np.ndarray:
        if len(slots) > 1:
            raise RuntimeError("batch too large")
        return batches(slots, *args)  # type: ignore[arg-type]

    engine.prefill_batch = only_one_row  # type: ignore[method-assign]
    result = ModelRunner("t", engine).execute(_leader_and_follower())  # type: ignore[arg-type]
    # The leader alone first (its slot then holds the prefix), then the follower reading it.
    assert [c[0] for c in engine.calls] == ["prefill", "prefill_batch"]
    assert engine.calls[-1][1] == ([1], [[14, 15]], [12], [(0, 12)])
    assert result.tokens == {0: 5, 1: 7} and not result.errors


def test_a_follower_of_a_leader_whose_load_failed_fails_before_any_call() -> None:
    class Cache:
        def load(self, slot: int, blocks: list[int]) -> None:
            raise RuntimeError("pool gone")

    engine = BorrowingStepEngine()
    runner = ModelRunner("t", engine, Cache())  # type: ignore[arg-type]
    step = _leader_and_follower()
    loads = [(0, [3])]  # the leader's cached prefix, which fails to load
    result = runner.execute(SchedulerOutput(step.plan, step.requests, [], loads, step.prefixes))
    assert result.errors == {
        0: "loading its cached prefix failed",
        1: "loading the prefix it shares failed",
    }
    assert engine.calls == []


def test_a_step_with_decode_rows_passes_the_prefixes_in_its_one_call() -> None:
    engine = BorrowingStepEngine()
    step = _leader_and_follower()
    decoding = Request("d", next(_ids), [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    decoding.append(4)
    plan = step.plan
    assert isinstance(plan, Plan)
    with_decode = Plan(
        request_ids=np.array([decoding.engine_id, *plan.request_ids], np.int64),
        slots=np.array([2, *plan.slots], np.int32),
        starts=np.array([3, *plan.starts], np.int32),
        counts=np.array([1, *plan.counts], np.int32),
        sample=np.array([True, *plan.sample]),
        preempted=plan.preempted,
    )
    output = SchedulerOutput(with_decode, [decoding, *step.requests], prefixes={2: (0, 12)})
    result = ModelRunner("t", engine).execute(output)  # type: ignore[arg-type]
    chunks = [[4], [*range(1, 13), 13, 14], [14, 15]]
    prefixes = [None, None, (0, 12)]
    assert engine.calls == [("prefill_batch", ([2, 0, 1], chunks, [3, 0, 12], prefixes))]
    assert result.tokens == {0: 7, 1: 7, 2: 7}

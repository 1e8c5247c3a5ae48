"""The packed prefill graph (several prompts a call): each row's result is exactly, bit for bit,
what it would be alone, unchunked, whatever shares its call and however its prompt was chunked;
the KV it stores is what decode steps then read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends.base import BatchedPrefill
from backends.onnx_runtime import OnnxDecoder
from backends.packed_prefill import packed_groups

LENGTHS = (40, 7, 120, 333, 65, 2, 17, 1)
"""Prompts of many sizes, one long enough that its attention spans several matmul blocks."""


@pytest.fixture(scope="module")
def packed(prepared_models: dict[str, Path]) -> OnnxDecoder:
    engine = OnnxDecoder(
        prepared_models["smollm2-135m-instruct"],
        max_slots=16,
        max_context=512,
        prefill_graph="int8",
    )
    assert engine.prefill_graph == "int8" and isinstance(engine, BatchedPrefill)
    return engine


def _prompts() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 49152, n) for n in LENGTHS]


def _alone(engine: OnnxDecoder, prompts: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for ids in prompts:
        engine.release(0)
        out.append(engine.prefill(0, ids, 0))
    engine.release(0)
    return out


def test_rows_of_one_call_equal_each_prompt_alone(packed: OnnxDecoder) -> None:
    prompts = _prompts()
    alone = _alone(packed, prompts)
    slots = [9, 2, 14, 5, 0, 11, 7, 3]  # any slots, in any order
    for slot in slots:
        packed.release(slot)
    together = packed.prefill_batch(slots, prompts, [0] * len(prompts))
    for row, expected in enumerate(alone):
        assert np.array_equal(together[row], expected), f"row {row} ({LENGTHS[row]} tokens)"
        assert packed.slot_length(slots[row]) == LENGTHS[row]


def test_chunks_in_any_company_equal_the_whole_prompt(packed: OnnxDecoder) -> None:
    prompts = _prompts()
    alone = _alone(packed, prompts)
    cuts = [13, 1, 100, 300, 64, 1, 5, 0]  # a past of every size, a last chunk of one token
    slots = list(range(len(prompts)))
    for slot in slots:
        packed.release(slot)
    firsts = [(s, ids[:cut], 0) for s, ids, cut in zip(slots, prompts, cuts, strict=True) if cut]
    packed.prefill_batch(*map(list, zip(*firsts, strict=True)))
    # The second chunks in two calls of different company: rows 0-3, then 4-7.
    for part in (slice(0, 4), slice(4, 8)):
        rows = range(len(prompts))[part]
        out = packed.prefill_batch(
            [slots[r] for r in rows], [prompts[r][cuts[r] :] for r in rows], [cuts[r] for r in rows]
        )
        for k, r in enumerate(rows):
            assert np.array_equal(out[k], alone[r]), f"row {r} cut at {cuts[r]}"


def test_the_stored_keys_and_values_serve_decode_as_an_unbatched_prefill(
    packed: OnnxDecoder,
) -> None:
    prompts = _prompts()[:4]
    for slot in range(8):
        packed.release(slot)
    packed.prefill_batch([0, 1, 2, 3], prompts, [0] * 4)
    for slot, ids in enumerate(prompts):
        packed.prefill(4 + slot, ids, 0)
    tokens = np.array([5, 6, 7, 8])
    positions = np.array([len(p) for p in prompts])
    batched = packed.decode(np.arange(4), tokens, positions)
    alone = packed.decode(np.arange(4, 8), tokens, positions)
    assert np.array_equal(batched, alone)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.prefill_batch([0, 0], [[1], [2]], [0, 0]), r"repeats a slot"),
        (lambda e: e.prefill_batch([0], [[1], [2]], [0]), r"equal-length and non-empty"),
        (lambda e: e.prefill_batch([], [], []), r"equal-length and non-empty"),
        (lambda e: e.prefill_batch([0, 1], [[1], []], [0, 0]), r"non-empty 1-D array"),
        (lambda e: e.prefill_batch([0, 1], [[1], [2]], [0, 5]), r"start=5 must be in 0\.\.0"),
        (lambda e: e.prefill_batch([0, 16], [[1], [2]], [0, 0]), r"slot=16 is out of range"),
        (lambda e: e.prefill_batch([0, 1], [[1], [49152]], [0, 0]), r"token id 49152"),
    ],
)
def test_bad_rows_are_refused_and_nothing_is_computed(
    packed: OnnxDecoder, call: object, message: str
) -> None:
    for slot in range(2):
        packed.release(slot)
    with pytest.raises(ValueError, match=message):
        call(packed)  # type: ignore[operator]
    assert packed.slot_length(0) == packed.slot_length(1) == 0


def test_rows_on_one_loaded_prefix_carry_it_once_and_equal_each_alone(
    packed: OnnxDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    size, prompts = 16, _prompts()
    prefix, questions = prompts[3][:96], [prompts[0][:9], prompts[1], prompts[6]]
    for slot in range(8):
        packed.release(slot)
    packed.open_pool(num_blocks=8, block_size=size)
    packed.prefill(7, prefix, 0)
    packed.save_blocks(range(6), 7, 0)
    alone = []
    for q in questions:
        packed.load_blocks(0, range(6))
        alone.append(packed.prefill(0, q, 96))
        packed.release(0)
    session = packed._packed._session  # type: ignore[union-attr]
    pasts: list[int] = []
    run = session.run

    def spy(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        pasts.append(feeds["past_key_values.0.key"].shape[1])
        return run(names, feeds)

    monkeypatch.setattr(session, "run", spy)
    for slot in (1, 2, 3):
        packed.load_blocks(slot, range(6))
    together = packed.prefill_batch([1, 2, 3], questions, [96] * 3)
    assert pasts == [96]  # the shared prefix once, not three times
    for row, expected in enumerate(alone):
        assert np.array_equal(together[row], expected)
    # Their next chunks share the prefix still, and carry their own tokens after it.
    nexts = packed.prefill_batch([1, 2], [questions[2][:2], questions[2][:3]], [105, 103])
    assert pasts[-1] == 96 + 9 + 7
    for slot, (row, ids) in enumerate(zip(nexts, (questions[0], questions[1]), strict=True)):
        packed.release(4)
        packed.load_blocks(4, range(6))
        packed.prefill(4, ids, 96)
        expected = packed.prefill(4, questions[2][: 2 + slot], 96 + len(ids))
        assert np.array_equal(row, expected)


def test_a_decode_inside_a_loaded_block_unshares_it(packed: OnnxDecoder) -> None:
    # Two slots load the same blocks; one then rewrites a position inside them (decode accepts
    # a position below the slot's length). A packed call must read that slot's own tokens.
    rng = np.random.default_rng(1)
    prefix, question = rng.integers(0, 49152, 96), rng.integers(0, 49152, 9)
    for slot in range(3):
        packed.release(slot)
    packed.open_pool(num_blocks=8, block_size=16)
    packed.prefill(14, prefix, 0)
    packed.save_blocks(range(6), 14, 0)
    other = (int(prefix[15]) + 1) % 49152
    for slot in (1, 2):
        packed.load_blocks(slot, range(6))
    packed.decode(np.array([1]), np.array([other]), np.array([15]))
    together = packed.prefill_batch([2, 1], [question, question], [16, 16])
    packed.load_blocks(0, range(6))
    packed.decode(np.array([0]), np.array([other]), np.array([15]))
    assert np.array_equal(together[1], packed.prefill(0, question, 16))


def test_slots_may_be_a_numpy_array(packed: OnnxDecoder) -> None:
    for slot in range(2):
        packed.release(slot)
    one = packed.prefill_batch(np.array([0]), [np.array([5, 6])], [0])
    packed.release(0)
    two = packed.prefill_batch(np.array([0, 1]), [np.array([5, 6]), np.array([7])], [0, 0])
    assert np.array_equal(one[0], two[0])


def test_rows_whose_padding_would_dwarf_their_work_are_computed_apart() -> None:
    # A burst of similar prompts: one call.
    assert packed_groups([37, 36, 39, 38] * 4, [305] * 16) == [
        sorted(range(16), key=lambda r: (-[37, 36, 39, 38][r % 4], -305))
    ]
    # A long fresh prompt beside a short chunk after a long past: apart (one call padded both
    # to 480 queries x 1,932 keys: 2.4x the work of two calls).
    assert packed_groups([32, 480], [1900, 0]) == [[1], [0]]
    # Fifteen one-token chunks after long pasts beside a 480-token one: the short ones together.
    groups = packed_groups([480] + [1] * 15, [1500] * 16)
    assert sorted(r for g in groups for r in g) == list(range(16))
    assert len(groups) == 2 and groups[0][0] == 0 and len(groups[1]) >= 14

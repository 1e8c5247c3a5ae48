"""The native KV block copies under backends.kv_pool (backends._kernels.kv_load_blocks,
kv_save_blocks and kv_copy_prefix): the same bytes NumPy's indexing would move, and every bad
argument refused by name before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from backends._kernels import kv_copy_prefix, kv_load_blocks, kv_save_blocks

LAYERS, SLOTS, HEADS, CONTEXT, DIM, BLOCKS, SIZE = 3, 4, 3, 40, 8, 12, 4


def buffers(dtype: type) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    slots = [
        rng.standard_normal((SLOTS, HEADS, CONTEXT, DIM)).astype(dtype) for _ in range(2 * LAYERS)
    ]
    pool = [
        rng.standard_normal((BLOCKS, HEADS, SIZE, DIM)).astype(dtype) for _ in range(2 * LAYERS)
    ]
    return slots, pool


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_blocks_go_out_of_a_slot_and_into_another_as_numpy_would_move_them(dtype: type) -> None:
    slots, pool = buffers(dtype)
    want_pool = [p.copy() for p in pool]
    blocks = np.array([7, 2, 10], np.int64)
    kv_save_blocks(slots, pool, 1, 8, blocks)
    for got, want, slot in zip(pool, want_pool, slots, strict=True):
        for j, block in enumerate(blocks):
            want[block] = slot[1, :, 8 + j * SIZE : 8 + (j + 1) * SIZE]
        np.testing.assert_array_equal(got, want)

    want_slots = [s.copy() for s in slots]
    order = np.array([10, 7], np.int64)
    kv_load_blocks(slots, pool, 3, order)
    for got, want, blocks_of in zip(slots, want_slots, pool, strict=True):
        want[3, :, : 2 * SIZE] = blocks_of[order].transpose(1, 0, 2, 3).reshape(HEADS, -1, DIM)
        np.testing.assert_array_equal(got, want)


def test_a_large_load_split_between_two_threads_moves_what_numpy_would() -> None:
    """From 1 MiB on a load is copied by two threads, half the buffers each (an odd count
    here): every buffer gets its blocks, in order."""
    rng = np.random.default_rng(1)
    shape, blocks = (2, 3, 1024, 64), 256
    slots = [rng.standard_normal(shape).astype(np.float16) for _ in range(7)]
    pool = [rng.standard_normal((blocks, 3, 4, 64)).astype(np.float16) for _ in range(7)]
    order = rng.permutation(blocks)[:240].astype(np.int64)  # 7 x 3 x 240 x 512 B: 2.6 MB
    want = [s.copy() for s in slots]
    kv_load_blocks(slots, pool, 1, order)
    for got, expected, blocks_of in zip(slots, want, pool, strict=True):
        expected[1, :, :960] = blocks_of[order].transpose(1, 0, 2, 3).reshape(3, -1, 64)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, p: (s[:-1], p), "as many"),
        (lambda s, p: ([], []), "as many"),
        (lambda s, p: (s, [x.astype(np.float32) for x in p]), "dtype"),
        (lambda s, p: (s, [x[:, :2] for x in p]), "heads"),
        (lambda s, p: ([*s[:-1], s[-1][:2]], p), "shape of the first"),
    ],
)
def test_buffers_that_do_not_match_are_refused(change: object, message: str) -> None:
    slots, pool = buffers(np.float16)
    before = [s.copy() for s in slots]
    bad_slots, bad_pool = change(slots, pool)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        kv_load_blocks(
            [np.ascontiguousarray(x) for x in bad_slots],
            [np.ascontiguousarray(x) for x in bad_pool],
            0,
            np.array([0], np.int64),
        )
    for got, want in zip(slots, before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_slots_blocks_and_positions_out_of_range_are_refused() -> None:
    slots, pool = buffers(np.float16)
    one = np.array([0], np.int64)
    with pytest.raises(ValueError, match="slot 4 is out of range"):
        kv_load_blocks(slots, pool, SLOTS, one)
    with pytest.raises(ValueError, match="block 12 is out of range"):
        kv_save_blocks(slots, pool, 0, 0, np.array([0, BLOCKS], np.int64))
    with pytest.raises(ValueError, match="positions from 38, 1 blocks of 4, are outside"):
        kv_save_blocks(slots, pool, 0, CONTEXT - 2, one)
    with pytest.raises(ValueError, match="positions from 0, 11 blocks of 4, are outside"):
        kv_load_blocks(slots, pool, 0, np.zeros(CONTEXT // SIZE + 1, np.int64))
    with pytest.raises(ValueError, match="are outside"):  # start + n * 4 would overflow
        kv_save_blocks(slots, pool, 0, 2**63 - 2, one)
    with pytest.raises(ValueError, match="blocks of >= 1 position"):
        kv_load_blocks(slots, [np.zeros((BLOCKS, HEADS, 0, DIM), np.float16)] * len(pool), 0, one)


@pytest.mark.parametrize("shape", [(SLOTS, HEADS, CONTEXT, DIM), (4, 3, 1024, 64)])
def test_a_prefix_is_copied_into_each_reader_as_numpy_would(shape: tuple[int, ...]) -> None:
    """Positions 0..n of one slot into the same positions of others, in every buffer (the
    larger shape: ~2.4 MB, two threads); the rest of every slot untouched."""
    rng = np.random.default_rng(2)
    slots = [rng.standard_normal(shape).astype(np.float16) for _ in range(5)]
    want = [s.copy() for s in slots]
    n = shape[2] - 3
    kv_copy_prefix(slots, 2, np.array([0, 3], np.int64), n)
    for got, expected in zip(slots, want, strict=True):
        expected[[0, 3], :, :n] = expected[2, :, :n]
        np.testing.assert_array_equal(got, expected)


def test_bad_prefix_copies_are_refused_by_name() -> None:
    slots, _ = buffers(np.float16)
    before = [s.copy() for s in slots]
    to = np.array([1], np.int64)
    for args, message in [
        ((slots, SLOTS, to, 4), "from=4 is not a slot"),
        ((slots, 1, to, 4), r"to\[0\]=1 must be another slot than from"),
        ((slots, 0, np.array([-1], np.int64), 4), r"to\[0\]=-1 must be another slot"),
        ((slots, 0, to, CONTEXT + 1), "n=41 must be in 0..40"),
        (([*slots, np.zeros((SLOTS, HEADS, 4, DIM), np.float16)], 0, to, 4), "0\\]'s shape"),
        (([*slots[:-1], slots[-1].astype(np.float32)], 0, to, 4), "buffers\\[0\\]'s dtype"),
        (([], 0, to, 4), "at least one slot buffer"),
    ]:
        with pytest.raises(ValueError, match=message):
            kv_copy_prefix(*args)
    for got, want in zip(slots, before, strict=True):
        np.testing.assert_array_equal(got, want)

from __future__ import annotations

import numpy as np
import pytest

from loadtest.benchmarks.native_reference import pack_reference
from router import _native


def make_rows(rng: np.random.Generator, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, 50_000, int(offsets[-1]), dtype=np.int64)
    return tokens, offsets


@pytest.mark.parametrize("pad_to", [0, 1, 7, 64])
@pytest.mark.parametrize("seed", range(5))
def test_pack_matches_reference(seed: int, pad_to: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, rng.integers(1, 20)).tolist()
    tokens, offsets = make_rows(rng, lengths)

    input_ids, mask = _native.pack(tokens, offsets, pad_id=-7, pad_to=pad_to)
    ref_ids, ref_mask = pack_reference(tokens, offsets, pad_id=-7, pad_to=pad_to)

    assert input_ids.dtype == np.int64 and mask.dtype == np.int64
    assert input_ids.shape == (len(lengths), max(max(lengths), pad_to))
    np.testing.assert_array_equal(input_ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_pack_results_are_writable_c_contiguous_and_independent() -> None:
    tokens, offsets = make_rows(np.random.default_rng(0), [3, 1])
    input_ids, _ = _native.pack(tokens, offsets, pad_id=0)
    assert input_ids.flags.c_contiguous and input_ids.flags.writeable
    input_ids[0, 0] = -1  # the result owns its buffer: the input is untouched
    assert tokens[0] != -1
    again, _ = _native.pack(tokens, offsets, pad_id=0)
    assert again[0, 0] == tokens[0]


def test_pack_accepts_int32_inputs() -> None:
    ids, mask = _native.pack(
        np.array([5, 6, 7], dtype=np.int32), np.array([0, 1, 3], dtype=np.int32), pad_id=0
    )
    np.testing.assert_array_equal(ids, [[5, 0], [6, 7]])
    np.testing.assert_array_equal(mask, [[1, 0], [1, 1]])


def test_pack_empty_batch_has_pad_to_columns() -> None:
    ids, mask = _native.pack(np.zeros(0, np.int64), np.zeros(1, np.int64), pad_id=0, pad_to=4)
    assert ids.shape == (0, 4) and mask.shape == (0, 4)


def test_pack_rejects_an_empty_row_naming_it() -> None:
    with pytest.raises(ValueError, match="row 1 is empty"):
        _native.pack(np.arange(3), np.array([0, 2, 2, 3]), pad_id=0)


@pytest.mark.parametrize(
    ("tokens", "offsets", "pad_to", "message"),
    [
        (np.arange(4), np.array([0, 3, 2]), 0, "non-decreasing"),
        (np.arange(4), np.array([0, 5]), 0, "within"),
        (np.arange(4), np.array([-1, 2]), 0, "within"),
        (
            np.arange(4).reshape(2, 2),
            np.array([0, 2]),
            0,
            r"tokens must have shape \(N,\), got \(2, 2\)",
        ),
        (np.arange(4), np.array([[0, 2]]), 0, r"offsets must have shape"),
        (np.arange(4), np.zeros(0, np.int64), 0, "offsets"),
        (np.arange(4), np.array([0, 2]), -1, "pad_to=-1"),
    ],
)
def test_pack_rejects_bad_input(
    tokens: np.ndarray, offsets: np.ndarray, pad_to: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _native.pack(tokens, offsets, pad_id=0, pad_to=pad_to)

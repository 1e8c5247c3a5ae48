from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.benchmarks.native_reference import sample_reference, uniform_draw
from router import _native
from tests.avx2_host import needs_qemu, run_as_avx2_host

# Native and reference may only disagree when a cut lies within exp() rounding
# of a cumulative sum (see native/include/irouter/sampler.h).
ROUNDING_MARGIN = 1e-12


def make_batch(
    rng: np.random.Generator,
    batch: int = 8,
    vocab: int = 1000,
    scale: float = 3.0,
    max_context: int = 40,
    **params: Any,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random logits and contexts; ``params`` set one value for every row."""
    logits = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    lengths = rng.integers(0, max_context + 1, batch)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Few distinct ids so penalties hit repeated tokens.
    tokens = rng.integers(0, min(vocab, 30), int(offsets[-1])).astype(np.int64)
    kwargs = {
        "temperature": np.full(batch, 1.0, np.float32),
        "top_k": np.zeros(batch, np.int32),
        "top_p": np.ones(batch, np.float32),
        "min_p": np.zeros(batch, np.float32),
        "repetition_penalty": np.ones(batch, np.float32),
        "presence_penalty": np.zeros(batch, np.float32),
        "frequency_penalty": np.zeros(batch, np.float32),
        "seeds": rng.integers(0, 2**64, batch, dtype=np.uint64),
        "tokens": tokens,
        "offsets": offsets,
        "prompt_lens": (lengths * rng.random(batch)).astype(np.int64),
    }
    for name, value in params.items():
        kwargs[name] = np.full(batch, value, kwargs[name].dtype)
    return logits, kwargs


def assert_matches_reference(logits: np.ndarray, kwargs: dict[str, np.ndarray]) -> None:
    got = _native.sample(logits, **kwargs)
    want, margins = sample_reference(logits, **kwargs)
    assert got.dtype == np.int64 and got.shape == (logits.shape[0],)
    differ = np.flatnonzero(got != want)
    assert np.all(margins[differ] < ROUNDING_MARGIN), (
        f"rows {differ.tolist()}: native {got[differ].tolist()} != reference "
        f"{want[differ].tolist()} (margins {margins[differ].tolist()})"
    )


PARAMS = {
    "greedy": {"temperature": 0.0},
    "greedy_penalised": {
        "temperature": 0.0,
        "repetition_penalty": 1.5,
        "presence_penalty": 0.7,
        "frequency_penalty": 0.4,
    },
    "temperature": {"temperature": 0.7},
    "hot": {"temperature": 2.5},
    "cold": {"temperature": 0.05},
    "top_k": {"top_k": 20},
    "top_k_1": {"top_k": 1},
    "top_k_all": {"top_k": 1000},
    "top_p": {"top_p": 0.9},
    "top_p_tiny": {"top_p": 0.01},
    "min_p": {"min_p": 0.1},
    "min_p_1": {"min_p": 1.0},
    "repetition": {"repetition_penalty": 1.3},
    "repetition_below_1": {"repetition_penalty": 0.7},
    "presence": {"presence_penalty": 1.5},
    "negative_presence": {"presence_penalty": -2.0},
    "frequency": {"frequency_penalty": 0.8},
    "everything": {
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.85,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
    },
    "top_p_and_min_p": {"top_p": 0.95, "min_p": 0.02, "temperature": 1.3},
}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
def test_matches_numpy_reference(params: dict[str, Any], scale: float, seed: int) -> None:
    logits, kwargs = make_batch(np.random.default_rng(seed), scale=scale, **params)
    assert_matches_reference(logits, kwargs)


def test_matches_reference_with_mixed_rows_and_a_large_vocabulary() -> None:
    rng = np.random.default_rng(42)
    logits, kwargs = make_batch(rng, batch=6, vocab=49152, max_context=200)
    kwargs["temperature"] = np.array([0, 0.7, 1.0, 0, 0.9, 1.2], np.float32)
    kwargs["top_k"] = np.array([0, 40, 0, 0, 0, 100], np.int32)
    kwargs["top_p"] = np.array([1, 0.9, 0.95, 1, 1, 0.5], np.float32)
    kwargs["min_p"] = np.array([0, 0, 0.05, 0, 0, 0.1], np.float32)
    kwargs["repetition_penalty"] = np.array([1.2, 1, 1.1, 1, 1.3, 1], np.float32)
    kwargs["frequency_penalty"] = np.array([0.5, 0, 0, 0, 0.2, 0.1], np.float32)
    assert_matches_reference(logits, kwargs)


@pytest.mark.parametrize("vocab", [1, 3, 7, 9, 15, 17, 1003])
@pytest.mark.parametrize("scale", [3.0, 400.0])
def test_matches_reference_at_any_vocabulary_length_and_spread(vocab: int, scale: float) -> None:
    # The exponentials run 8 or 4 lanes at a time with a scalar tail; at scale 400 most logits
    # lie more than 708 below the largest, where an exponential is taken as 0.
    logits, kwargs = make_batch(np.random.default_rng(vocab), vocab=vocab, scale=scale)
    kwargs["temperature"] = np.array([0.5, 1, 2, 0.7, 1, 1, 0.3, 1.5], np.float32)
    kwargs["top_p"] = np.array([1, 0.9, 1, 0.5, 1, 0.99, 1, 0.8], np.float32)
    kwargs["min_p"] = np.array([0, 0, 0.1, 0, 1e-30, 0, 0, 0], np.float32)
    assert_matches_reference(logits, kwargs)


SAMPLE_EACH = """
import sys
import numpy as np
from router import _native

given = np.load(sys.argv[1])
batches = sorted({name.split("/")[0] for name in given.files})
tokens = {}
for b in batches:
    kwargs = {n.split("/")[1]: given[n] for n in given.files if n.startswith(b + "/")}
    tokens[b] = _native.sample(kwargs.pop("logits"), **kwargs)
np.savez(sys.argv[2], **tokens)
"""


@needs_qemu
def test_an_avx2_only_cpu_samples_as_the_reference_does(tmp_path: Path) -> None:
    """The sampler's exponentials 4 lanes at a time (AVX2 + FMA), chosen by the CPU itself where
    it has no AVX-512 (tests/avx2_host.py), against the same reference as on this machine."""
    batches = {}
    for i, (name, scale) in enumerate(
        [("everything", 3.0), ("temperature", 12.0), ("top_p_and_min_p", 0.5), ("hot", 3.0)]
    ):
        rng = np.random.default_rng(i)
        batches[name] = make_batch(rng, vocab=1003, scale=scale, **PARAMS[name])
    batches["large"] = make_batch(np.random.default_rng(7), vocab=49152, temperature=0.7, top_p=0.9)
    np.savez(
        tmp_path / "given.npz",
        **{
            f"{b}/{n}": v
            for b, (logits, kwargs) in batches.items()
            for n, v in {"logits": logits, **kwargs}.items()
        },
    )
    run_as_avx2_host(SAMPLE_EACH, str(tmp_path / "given.npz"), str(tmp_path / "tokens.npz"))
    tokens = np.load(tmp_path / "tokens.npz")
    for b, (logits, kwargs) in batches.items():
        want, margins = sample_reference(logits, **kwargs)
        differ = np.flatnonzero(tokens[b] != want)
        assert np.all(margins[differ] < ROUNDING_MARGIN), (b, differ, tokens[b], want)


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"top_k": 3}, {"top_p": 0.5}, {}])
def test_ties_break_towards_the_lowest_index(params: dict[str, Any]) -> None:
    rng = np.random.default_rng(3)
    logits, kwargs = make_batch(rng, batch=16, vocab=64, **params)
    logits = rng.integers(-2, 3, logits.shape).astype(np.float32)  # many exact ties
    assert_matches_reference(logits, kwargs)
    if params.get("temperature") == 0.0:
        flat = np.zeros((1, 8), np.float32)
        _, one = make_batch(rng, batch=1, vocab=8, max_context=0, temperature=0.0)
        assert _native.sample(flat, **one).tolist() == [0]


def test_masked_tokens_are_never_sampled_and_all_masked_gives_token_0() -> None:
    rng = np.random.default_rng(5)
    logits, kwargs = make_batch(rng, batch=32, vocab=100, max_context=0, temperature=1.5)
    logits[:, 10:] = -np.inf
    assert set(_native.sample(logits, **kwargs).tolist()) <= set(range(10))
    assert_matches_reference(logits, kwargs)
    logits[0] = -np.inf
    assert _native.sample(logits, **kwargs)[0] == 0


def bitmask(allowed: list[set[int]], vocab: int, words: int | None = None) -> np.ndarray:
    """uint32[len(allowed), ceil(vocab / 32)]: bit t % 32 of word t // 32 allows token t."""
    out = np.zeros((len(allowed), words or (vocab + 31) // 32), np.uint32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            out[row, t // 32] |= np.uint32(1 << (t % 32))
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_masks_restrict_their_rows_and_leave_free_rows_as_they_were(
    temperature: float,
) -> None:
    rng = np.random.default_rng(11)
    vocab = 1000  # not a multiple of 32: the last word is partial
    logits, kwargs = make_batch(
        rng, batch=6, vocab=vocab, temperature=temperature, repetition_penalty=1.3
    )
    allowed = [{3, 999}, {500}, set(range(0, vocab, 7))]
    masks = bitmask(allowed, vocab)
    mask_rows = np.array([0, -1, 1, -1, 2, 0], np.int32)
    got = _native.sample(logits, **kwargs, masks=masks, mask_rows=mask_rows)
    free = _native.sample(logits, **kwargs)
    for row, k in enumerate(mask_rows.tolist()):
        if k < 0:
            assert got[row] == free[row]
        else:
            assert int(got[row]) in allowed[k]
    # A masked row samples exactly as the same row with the disallowed logits at -inf.
    masked = logits.copy()
    for row, k in enumerate(mask_rows.tolist()):
        if k >= 0:
            keep = np.zeros(vocab, bool)
            keep[list(allowed[k])] = True
            masked[row, ~keep] = -np.inf
    assert got.tolist() == _native.sample(masked, **kwargs).tolist()


def test_a_mask_allowing_no_token_or_a_bad_mask_row_is_refused_by_name() -> None:
    rng = np.random.default_rng(12)
    logits, kwargs = make_batch(rng, batch=2, vocab=40)
    empty = bitmask([set(), {1}], 40)
    empty[0, 1] = np.uint32(0xFFFF0000)  # bits past the vocabulary allow nothing
    with pytest.raises(ValueError, match=r"mask_rows\[1\]=0 names a mask that allows no token"):
        _native.sample(logits, **kwargs, masks=empty, mask_rows=np.array([1, 0], np.int32))
    ok = bitmask([{1}], 40)
    with pytest.raises(ValueError, match=r"mask_rows\[0\]=5 must be -1 \(free\)"):
        _native.sample(logits, **kwargs, masks=ok, mask_rows=np.array([5, -1], np.int32))
    with pytest.raises(ValueError, match="at least ceil"):
        _native.sample(logits, **kwargs, masks=ok[:, :1], mask_rows=np.array([0, 0], np.int32))
    with pytest.raises(ValueError, match="pass both or neither"):
        _native.sample(logits, **kwargs, masks=ok)
    with pytest.raises(ValueError, match="mask_rows must have shape"):
        _native.sample(logits, **kwargs, masks=ok, mask_rows=np.array([0], np.int32))


def test_penalties_follow_the_documented_formulas() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([[3.0, 2.9, -1.0, -1.1]], np.float32)
    _, kwargs = make_batch(rng, batch=1, vocab=4, temperature=0.0)
    kwargs["tokens"] = np.array([0, 2, 1], np.int64)  # prompt [0, 2], output [1]
    kwargs["offsets"] = np.array([0, 3], np.int64)
    kwargs["prompt_lens"] = np.array([2], np.int64)

    # Presence applies to output tokens only.
    kwargs["presence_penalty"] = np.array([0.2], np.float32)  # only output token 1 pays
    assert _native.sample(logits, **kwargs).tolist() == [0]
    kwargs["presence_penalty"] = np.array([-0.2], np.float32)  # 2.9 + 0.2 > 3.0
    assert _native.sample(logits, **kwargs).tolist() == [1]

    # Repetition multiplies negative logits: token 2 (prompt) -1.0 * 4 < token 3's -1.1.
    masked = logits.copy()
    masked[0, :2] = -np.inf
    kwargs["presence_penalty"] = np.zeros(1, np.float32)
    kwargs["repetition_penalty"] = np.array([4.0], np.float32)
    assert _native.sample(masked, **kwargs).tolist() == [3]

    # Frequency scales with the count of a token in the output only.
    kwargs["repetition_penalty"] = np.ones(1, np.float32)
    kwargs["tokens"] = np.array([1, 0, 0], np.int64)  # prompt [1], output [0, 0]
    kwargs["prompt_lens"] = np.array([1], np.int64)
    kwargs["frequency_penalty"] = np.array([0.04], np.float32)  # 3.0 - 0.08 > 2.9
    assert _native.sample(logits, **kwargs).tolist() == [0]
    kwargs["frequency_penalty"] = np.array([0.06], np.float32)  # 3.0 - 0.12 < 2.9
    assert _native.sample(logits, **kwargs).tolist() == [1]


def test_logits_are_not_modified() -> None:
    logits, kwargs = make_batch(np.random.default_rng(1), **PARAMS["everything"])
    before = logits.copy()
    _native.sample(logits, **kwargs)
    np.testing.assert_array_equal(logits, before)


def test_row_result_does_not_depend_on_the_batch_it_is_in() -> None:
    rng = np.random.default_rng(9)
    logits, kwargs = make_batch(rng, batch=12, vocab=5000, top_p=0.95, temperature=1.2)
    together = _native.sample(logits, **kwargs)
    for b in range(12):
        start, end = kwargs["offsets"][b], kwargs["offsets"][b + 1]
        alone = {
            name: value[b : b + 1]
            for name, value in kwargs.items()
            if name not in ("tokens", "offsets")
        }
        alone["tokens"] = kwargs["tokens"][start:end]
        alone["offsets"] = np.array([0, end - start], np.int64)
        assert _native.sample(logits[b : b + 1], **alone)[0] == together[b]
    # Reversed order, and a second call: the same tokens.
    rev = {name: value[::-1].copy() for name, value in kwargs.items()}
    lengths = np.diff(kwargs["offsets"])[::-1]
    rev["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rev["tokens"] = np.concatenate(
        [
            kwargs["tokens"][kwargs["offsets"][b] : kwargs["offsets"][b + 1]]
            for b in range(11, -1, -1)
        ]
    ).astype(np.int64)
    np.testing.assert_array_equal(_native.sample(logits[::-1].copy(), **rev), together[::-1])
    np.testing.assert_array_equal(_native.sample(logits, **kwargs), together)


def test_draw_follows_seed_and_step() -> None:
    # A flat distribution makes the token a direct readout of u.
    rng = np.random.default_rng(0)
    vocab = 1 << 16
    logits = np.zeros((1, vocab), np.float32)
    _, kwargs = make_batch(rng, batch=1, vocab=vocab, max_context=0)
    for seed, step in [(0, 0), (1, 0), (12345, 7), (2**64 - 1, 3)]:
        kwargs["seeds"] = np.array([seed], np.uint64)
        kwargs["tokens"] = np.zeros(step + 2, np.int64)
        kwargs["offsets"] = np.array([0, step + 2], np.int64)
        kwargs["prompt_lens"] = np.array([2], np.int64)
        assert _native.sample(logits, **kwargs)[0] == int(uniform_draw(seed, step) * vocab)


def test_sampled_tokens_stay_inside_top_k_and_the_nucleus() -> None:
    rng = np.random.default_rng(11)
    logits, kwargs = make_batch(rng, batch=200, vocab=300, max_context=0, top_k=5)
    got = _native.sample(logits, **kwargs)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    assert all(got[b] in top5[b] for b in range(200))
    assert len(set((got == top5[:, 0]).tolist())) == 2  # not always the argmax

    logits, kwargs = make_batch(rng, batch=200, vocab=300, max_context=0, top_p=0.5)
    got = _native.sample(logits, **kwargs)
    for b in range(200):
        p = np.exp(logits[b].astype(np.float64) - logits[b].max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        nucleus = order[: np.searchsorted(np.cumsum(p[order]), 0.5) + 1]
        assert got[b] in nucleus


def base_kwargs(batch: int = 2, vocab: int = 10) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return make_batch(np.random.default_rng(0), batch=batch, vocab=vocab, max_context=3)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("logits", np.zeros(10, np.float32), r"logits must have shape \(B, V\), got \(10,\)"),
        ("temperature", np.ones(3, np.float32), r"temperature must have shape .*got \(3,\)"),
        ("top_k", np.zeros((2, 1), np.int32), r"top_k must have shape .*got \(2, 1\)"),
        ("seeds", np.zeros(1, np.uint64), r"seeds must have shape .*got \(1,\)"),
        ("offsets", np.zeros(2, np.int64), r"offsets must have shape .*got \(2,\)"),
        ("prompt_lens", np.zeros(4, np.int64), r"prompt_lens must have shape .*got \(4,\)"),
        ("tokens", np.zeros((1, 1), np.int64), r"tokens must have shape \(N,\), got \(1, 1\)"),
    ],
)
def test_bad_shapes_raise_value_error_naming_the_argument(
    name: str, value: np.ndarray, message: str
) -> None:
    logits, kwargs = base_kwargs()
    if name == "logits":
        logits = value
    else:
        kwargs[name] = value
    with pytest.raises(ValueError, match=message):
        _native.sample(logits, **kwargs)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temperature", -1.0, r"temperature\[0\]=-1"),
        ("top_k", -1, r"top_k\[0\]=-1"),
        ("top_p", 0.0, r"top_p\[0\]=0"),
        ("top_p", 1.5, r"top_p\[0\]=1.5"),
        ("min_p", -0.1, r"min_p\[0\]"),
        ("repetition_penalty", 0.0, r"repetition_penalty\[0\]=0"),
        ("presence_penalty", np.inf, r"presence_penalty\[0\]=inf"),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_row(
    name: str, value: float, message: str
) -> None:
    logits, kwargs = base_kwargs()
    kwargs[name] = kwargs[name].copy()
    kwargs[name][0] = value
    with pytest.raises(ValueError, match=message):
        _native.sample(logits, **kwargs)


def test_bad_context_raises_value_error() -> None:
    logits, kwargs = base_kwargs(vocab=10)
    bad = dict(kwargs, tokens=np.full_like(kwargs["tokens"], 10))
    if bad["tokens"].size:
        with pytest.raises(ValueError, match=r"tokens\[\d+\]=10 is not a token id"):
            _native.sample(logits, **bad)
    bad = dict(kwargs, prompt_lens=np.array([99, 0], np.int64))
    with pytest.raises(ValueError, match=r"prompt_lens\[0\]=99"):
        _native.sample(logits, **bad)
    bad = dict(kwargs, offsets=np.array([0, 1, 10**6], np.int64))
    with pytest.raises(ValueError, match="offsets"):
        _native.sample(logits, **bad)


def test_logits_must_already_be_float32() -> None:
    logits, kwargs = base_kwargs()
    with pytest.raises(TypeError):
        _native.sample(logits.astype(np.float64), **kwargs)


def test_gil_is_released_while_sampling() -> None:
    """The main thread must run Python while a worker is inside sample().

    Ticks can land near the edges of a call even with the GIL held (a thread
    switch between reading the clock and entering the call), so only the
    middle half of each call counts; with a 1 ms switch interval a held GIL
    leaves it empty (checked with sorted() on a long list, which holds it).
    """
    logits, kwargs = make_batch(
        np.random.default_rng(0), batch=16, vocab=49152, max_context=0, temperature=1.5
    )
    calls: list[tuple[float, float]] = []
    done = threading.Event()

    def worker() -> None:
        for _ in range(3):
            start = time.perf_counter()
            _native.sample(logits, **kwargs)
            calls.append((start, time.perf_counter()))
        done.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        thread = threading.Thread(target=worker)
        ticks: list[float] = []
        thread.start()
        while not done.is_set():
            ticks.append(time.perf_counter())
        thread.join()
    finally:
        sys.setswitchinterval(old_interval)
    middle = [t for t in ticks for lo, hi in calls if lo + (hi - lo) / 4 < t < hi - (hi - lo) / 4]
    assert middle

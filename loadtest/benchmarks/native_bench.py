"""Native kernels vs their NumPy/Python references, measured in the same run.

    python -m loadtest.benchmarks.native_bench

One line per figure: median time per call of native and reference, and the
speed-up ratio reference/native. Goals: sampler >= 10x at B=16 x V=49152,
scheduler step <= 50 us for 256 running decodes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from loadtest.benchmarks.native_reference import (
    ReferenceScheduler,
    pack_reference,
    sample_reference,
)
from router import _native

BATCH, VOCAB = 16, 49152


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up (workspaces, caches)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, native_s: float, reference_s: float) -> None:
    print(
        f"{name:<44} native {native_s * 1e6:10.1f} us   reference {reference_s * 1e6:10.1f} us"
        f"   ratio {reference_s / native_s:7.1f}x"
    )


def sampler_inputs(rng: np.random.Generator, **params: float) -> dict[str, np.ndarray]:
    lengths = rng.integers(64, 512, BATCH)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    kwargs: dict[str, np.ndarray] = {
        "logits": (rng.standard_normal((BATCH, VOCAB)) * 4).astype(np.float32),
        "temperature": np.zeros(BATCH, np.float32),
        "top_k": np.zeros(BATCH, np.int32),
        "top_p": np.ones(BATCH, np.float32),
        "min_p": np.zeros(BATCH, np.float32),
        "repetition_penalty": np.ones(BATCH, np.float32),
        "presence_penalty": np.zeros(BATCH, np.float32),
        "frequency_penalty": np.zeros(BATCH, np.float32),
        "seeds": rng.integers(0, 2**63, BATCH).astype(np.uint64),
        "tokens": rng.integers(0, VOCAB, int(offsets[-1])).astype(np.int64),
        "offsets": offsets,
        "prompt_lens": lengths // 2,
    }
    for name, value in params.items():
        kwargs[name] = np.full(BATCH, value, kwargs[name].dtype)
    return kwargs


def bench_sampler(rng: np.random.Generator) -> None:
    cases = {
        "greedy": {},
        "greedy + penalties": {
            "repetition_penalty": 1.1,
            "presence_penalty": 0.3,
            "frequency_penalty": 0.2,
        },
        "temp 0.8 + top-k 50 + top-p 0.9 + penalties": {
            "temperature": 0.8,
            "top_k": 50,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.3,
            "frequency_penalty": 0.2,
        },
        "temp 0.8 + top-p 0.9 + penalties": {
            "temperature": 0.8,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.3,
            "frequency_penalty": 0.2,
        },
        "temp 1.0 + min-p 0.05": {"temperature": 1.0, "min_p": 0.05},
    }
    for name, params in cases.items():
        kwargs = sampler_inputs(rng, **params)
        native = median_seconds(lambda kwargs=kwargs: _native.sample(**kwargs), 30)
        reference = median_seconds(lambda kwargs=kwargs: sample_reference(**kwargs), 3)
        report(f"sample {BATCH}x{VOCAB} {name}", native, reference)


def bench_pack(rng: np.random.Generator) -> None:
    lengths = rng.integers(16, 512, 64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, 30522, int(offsets[-1])).astype(np.int64)
    native = median_seconds(lambda: _native.pack(tokens, offsets, pad_id=0), 200)
    reference = median_seconds(lambda: pack_reference(tokens, offsets, pad_id=0), 50)
    report("pack B=64, rows of 16..511 tokens", native, reference)


def bench_scheduler(num_running: int = 256, steps: int = 300) -> None:
    def step_time(sched: _native.Scheduler | ReferenceScheduler) -> float:
        for rid in range(num_running):
            sched.add_request(rid, num_prompt_tokens=32, max_new_tokens=4000)
        out = sched.schedule()  # admits everything (prefill)
        ids = out.request_ids
        times = []
        for _ in range(steps):
            sched.append_tokens(ids.tolist() if isinstance(ids, np.ndarray) else ids)
            start = time.perf_counter()
            out = sched.schedule()
            times.append(time.perf_counter() - start)
            ids = out.request_ids
        assert len(ids) == num_running
        return statistics.median(times)

    config = {
        "max_slots": num_running,
        "token_budget": 32 * num_running,
        "max_waiting": num_running,
        "max_context": 4096,
    }
    native = step_time(_native.Scheduler(**config))
    reference = step_time(ReferenceScheduler(**config))
    report(f"schedule() {num_running} running decodes", native, reference)


def main() -> None:
    rng = np.random.default_rng(0)
    bench_sampler(rng)
    bench_pack(rng)
    bench_scheduler()


if __name__ == "__main__":
    main()

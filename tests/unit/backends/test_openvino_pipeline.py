"""OpenVinoGenerator (OpenVINO GenAI continuous batching) against the fp32 ONNX reference.

One pipeline per module, at precision 'f32': F16-re-encoded GGUF weights (exact for this
model's Q4_1/Q8_0 blocks), f32 compute and KV cache. At that setting its greedy tokens equal
the fp32 ONNX model's; at the default setting GenAI rounds Q4_1 zero points and the texts part
within a few tokens (see backends/openvino/pipeline.py), so the default is not compared here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from backends.base import BURST_GAP_S, GenerationRequest, RequestEngine, UnsupportedParameter
from backends.onnx_runtime import OnnxDecoder
from backends.openvino import worker
from backends.openvino.ir import IR_XML, cached_ir
from backends.openvino.pipeline import OpenVinoGenerator
from router.models.prepare import smollm2_gguf_path

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\nTell me a story."
    "<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\n",
]
N = 12


@pytest.fixture(scope="module")
def tokenizer(prepared_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(prepared_models["smollm2-135m-instruct"] / "tokenizer.json"))


@pytest.fixture(scope="module")
async def engine(prepared_models: dict[str, Path]) -> AsyncIterator[OpenVinoGenerator]:
    engine = OpenVinoGenerator(
        prepared_models["smollm2-135m-instruct"],
        gguf_path=smollm2_gguf_path(),
        precision="f32",
        max_slots=4,
        max_context=256,
        prefix_cache_mb=8,  # every test runs with GenAI's prefix caching on
    )
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def reference(prepared_models: dict[str, Path], tokenizer: Tokenizer) -> list[list[int]]:
    """Greedy tokens of the fp32 ONNX model, one prompt at a time."""
    onnx = OnnxDecoder(prepared_models["smollm2-135m-instruct-fp32"], max_slots=1, max_context=64)
    out = []
    for prompt in PROMPTS:
        ids = np.array(tokenizer.encode(prompt, add_special_tokens=False).ids, np.int64)
        logits = onnx.prefill(0, ids, 0)
        tokens = [int(np.argmax(logits))]
        for i in range(N - 1):
            step = onnx.decode(np.array([0]), np.array([tokens[-1]]), np.array([len(ids) + i]))
            tokens.append(int(np.argmax(step[0])))
        onnx.release(0)
        out.append(tokens)
    return out


def request(tokenizer: Tokenizer, prompt: str, **sampling: object) -> GenerationRequest:
    fields: dict[str, object] = {"max_tokens": N, "temperature": 0.0, "ignore_eos": True}
    fields |= sampling
    ids = tuple(tokenizer.encode(prompt, add_special_tokens=False).ids)
    return GenerationRequest(request_id="test", prompt_ids=ids, prompt=prompt, **fields)  # type: ignore[arg-type]


async def run(engine: OpenVinoGenerator, req: GenerationRequest) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason = None
    async for chunk in engine.generate(req):
        assert reason is None, "a chunk after the finishing one"
        tokens.extend(chunk.token_ids)
        reason = chunk.finish_reason
    return tokens, reason


async def wait_idle(engine: OpenVinoGenerator) -> None:
    for _ in range(500):
        if engine.num_active == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{engine.num_active} requests still held")


async def test_greedy_f32_equals_the_onnx_fp32_reference(
    engine: OpenVinoGenerator,
    tokenizer: Tokenizer,
    reference: list[list[int]],
    prepared_models: dict[str, Path],
) -> None:
    assert isinstance(engine, RequestEngine)
    tokens, reason = await run(engine, request(tokenizer, PROMPTS[0]))
    assert tokens == reference[0]
    assert reason == "length"
    # Again, its prompt's blocks now cached (prefix caching): the same tokens.
    assert (await run(engine, request(tokenizer, PROMPTS[0])))[0] == reference[0]
    # The converted IR is cached: later loads skip the GGUF.
    model_dir = prepared_models["smollm2-135m-instruct"]
    assert (cached_ir(model_dir, exact=True) / IR_XML).is_file()


async def test_concurrent_requests_each_get_their_own_output(
    engine: OpenVinoGenerator, tokenizer: Tokenizer, reference: list[list[int]]
) -> None:
    results = await asyncio.gather(*(run(engine, request(tokenizer, p)) for p in PROMPTS))
    assert [tokens for tokens, _ in results] == reference
    await wait_idle(engine)


async def test_closing_the_iterator_cancels_and_frees_the_request(
    engine: OpenVinoGenerator, tokenizer: Tokenizer, reference: list[list[int]]
) -> None:
    stream = engine.generate(request(tokenizer, PROMPTS[1], max_tokens=200))
    first = await anext(stream)
    assert first.token_ids and first.finish_reason is None
    await stream.aclose()
    await wait_idle(engine)
    for _ in range(100):  # the pipeline drops it at its next step, then has nothing to step
        if engine.worker_idle:
            break
        await asyncio.sleep(0.01)
    assert engine.worker_idle
    # The engine still serves, and the freed blocks are reusable.
    assert (await run(engine, request(tokenizer, PROMPTS[0])))[0] == reference[0]


@pytest.mark.parametrize("ignore_eos", [False, True])
async def test_stop_token_ends_with_stop_and_is_returned(
    engine: OpenVinoGenerator, tokenizer: Tokenizer, reference: list[list[int]], ignore_eos: bool
) -> None:
    # GenAI itself ignores stop_token_ids under ignore_eos; the engine must still stop there.
    stop = reference[2][3]
    first = reference[2].index(stop)
    req = request(tokenizer, PROMPTS[2], stop_token_ids=(stop,), ignore_eos=ignore_eos)
    tokens, reason = await run(engine, req)
    assert reason == "stop"
    assert tokens == reference[2][: first + 1]
    await wait_idle(engine)


async def test_seeded_sampling_is_reproducible_alongside_other_requests(
    engine: OpenVinoGenerator, tokenizer: Tokenizer
) -> None:
    sampled = request(tokenizer, PROMPTS[1], temperature=1.5, top_k=50, seed=1234)
    alone, _ = await run(engine, sampled)
    other = dataclasses.replace(sampled, seed=99)
    together = await asyncio.gather(run(engine, sampled), run(engine, other))
    assert together[0][0] == alone
    assert together[1][0] != alone  # the seed is really used
    assert len(alone) == N


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_p", 1.5), ("min_p", -0.1), ("presence_penalty", 3.0), ("top_k", -1), ("seed", -5)],
)
async def test_unsupported_sampling_value_is_refused_by_name(
    engine: OpenVinoGenerator, tokenizer: Tokenizer, field: str, value: float
) -> None:
    with pytest.raises(UnsupportedParameter, match=field) as info:
        await run(engine, request(tokenizer, PROMPTS[0], **{field: value}))
    assert info.value.field == field
    assert engine.num_active == 0


async def test_prompt_plus_max_tokens_beyond_the_context_is_refused(
    engine: OpenVinoGenerator, tokenizer: Tokenizer
) -> None:
    with pytest.raises(UnsupportedParameter, match="max_context=256") as info:
        await run(engine, request(tokenizer, PROMPTS[0], max_tokens=250))
    assert info.value.field == "max_tokens"


class Steps:
    """An observer that records each step's batch (requests stepped) and seconds."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.seconds: list[float] = []

    def on_step(self, batch: int, waiting: int, running: int, seconds: float) -> None:
        if batch:
            self.batches.append(batch)
            self.seconds.append(seconds)


async def test_a_burst_arriving_while_idle_starts_in_one_step(
    engine: OpenVinoGenerator,
    tokenizer: Tokenizer,
    reference: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls 1 ms apart share the first step (the worker gathers until a gap of
    backends.base.BURST_GAP_S). The event loop writes each call to the worker's pipe itself
    (pipe_writer.py): a thread woken to write them waited for the GIL while the loop ran, and
    they reached the worker in clumps a GIL switch interval (5 ms) apart, wider than its gap.
    The test spaces the writes, and a try counts only if they really left that close (the
    test's process can be kept off the CPU in a full run)."""
    sent: list[tuple[float, float]] = []
    """Each call's pipe write: the times just before and just after it."""

    def gaps() -> list[float]:
        """Upper bounds of the time between two writes (the thread may be preempted anywhere)."""
        return [after - before for (before, _), (_, after) in itertools.pairwise(sent)]

    class SpacedPipe:
        def __init__(self, pipe: Any) -> None:
            self._pipe = pipe

        def send(self, message: object) -> None:
            if not isinstance(message, worker.Add):
                self._pipe.send(message)
                return
            if sent:
                time.sleep(0.001)  # the loop's thread: nothing else runs meanwhile
            before = time.perf_counter()
            self._pipe.send(message)
            sent.append((before, time.perf_counter()))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._pipe, name)

    monkeypatch.setattr(engine, "_to_worker", SpacedPipe(engine._to_worker))
    tries = []
    for _ in range(5):
        await wait_idle(engine)
        sent.clear()
        steps = Steps()
        engine._observer = steps  # type: ignore[assignment]
        try:
            calls = [run(engine, request(tokenizer, prompt)) for prompt in PROMPTS]
            results = await asyncio.gather(*calls)
        finally:
            engine._observer = None
        assert [tokens for tokens, _ in results] == reference
        if max(gaps()) >= BURST_GAP_S / 2:
            continue
        # The worker process, too, can be kept off the CPU past a gap while a full run's other
        # tests use both cores: one try in one step is the behaviour (without gathering, the
        # first call's step starts before the second call is written, every time).
        if steps.batches[0] == len(PROMPTS):
            return
        tries.append((steps.batches[:4], gaps()))
    if not tries:
        pytest.skip(
            f"5 bursts, none with its calls written within {BURST_GAP_S / 2 * 1000} ms of "
            "each other: this machine was too busy to see the gathering"
        )
    pytest.fail(
        f"5 bursts, none in one step with its calls {BURST_GAP_S / 2 * 1000} ms apart: {tries}"
    )


async def test_the_event_loop_runs_while_the_pipeline_steps(
    engine: OpenVinoGenerator, tokenizer: Tokenizer
) -> None:
    """GenAI's step() holds the GIL for the whole step: stepped in this process, it stopped the
    event loop (every other call) for each step. It steps in a worker process instead."""
    await wait_idle(engine)
    times = Steps()
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    long_prompt = " ".join(PROMPTS * 8)  # a prefill of ~200 tokens: one long step
    ticker = asyncio.create_task(tick())
    engine._observer = times  # type: ignore[assignment]
    try:
        await run(engine, request(tokenizer, long_prompt[:900], max_tokens=2))
    finally:
        engine._observer = None
        done.set()
        await ticker
    longest = max(times.seconds)
    if longest < 0.1:
        pytest.skip(
            f"this CPU prefilled the long prompt in steps of {longest * 1000:.0f} ms at most: "
            "a step of >= 100 ms is needed to see whether the loop stalls during one"
        )
    assert max(gaps) < longest / 2, (max(gaps), times.seconds)


def started_engine(prepared_models: dict[str, Path]) -> OpenVinoGenerator:
    """An engine of its own (its worker is killed), the default precision, started."""
    engine = OpenVinoGenerator(
        prepared_models["smollm2-135m-instruct"],
        gguf_path=smollm2_gguf_path(),
        max_slots=2,
        max_context=256,
    )
    engine.start()
    return engine


async def test_a_worker_that_dies_fails_the_calls_in_flight_and_is_started_again(
    prepared_models: dict[str, Path], tokenizer: Tokenizer
) -> None:
    engine = started_engine(prepared_models)
    try:
        first = engine._process
        before = await run(engine, request(tokenizer, PROMPTS[0]))
        stream = engine.generate(request(tokenizer, PROMPTS[0], max_tokens=200))
        assert (await anext(stream)).token_ids
        first.kill()
        with pytest.raises(RuntimeError, match=r"worker exited .*starting it again"):
            async for _ in stream:
                pass
        # Refused by name while the new worker loads (its first try waits RESTART_DELAYS_S[0]).
        with pytest.raises(RuntimeError, match="worker exited"):
            await run(engine, request(tokenizer, PROMPTS[1]))
        assert engine.num_active == 0
        deadline = time.monotonic() + 120
        while engine.restarts == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine.restarts == 1 and engine._process is not first
        assert engine._process.is_alive() and not first.is_alive()
        assert await run(engine, request(tokenizer, PROMPTS[0])) == before  # the new one serves
    finally:
        engine.stop()
    assert not engine._process.is_alive()


async def test_stop_while_a_dead_worker_is_being_replaced_leaves_no_worker(
    prepared_models: dict[str, Path],
) -> None:
    others = {p.pid for p in multiprocessing.active_children()}  # the module's engine's worker
    engine = started_engine(prepared_models)
    first = engine._process
    first.kill()
    deadline = time.monotonic() + 30
    while "starting it again" not in engine._broken and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    engine.stop()  # during the restart's wait or its load
    assert engine.restarts == 0 and engine._process is first and not first.is_alive()
    assert engine._broken == "the OpenVINO GenAI engine is stopped"
    left = [p for p in multiprocessing.active_children() if p.pid not in others]
    assert not left, left


async def test_the_worker_ignores_the_signals_that_stop_the_router(
    engine: OpenVinoGenerator, tokenizer: Tokenizer, reference: list[list[int]]
) -> None:
    """Ctrl-C and a service manager's SIGTERM reach the whole process group: the router drains
    its calls, then stops the worker itself."""
    await wait_idle(engine)
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(engine._process.pid, sig)
    # A worker killed by them would fail this call (and be gone after it).
    assert (await run(engine, request(tokenizer, PROMPTS[0])))[0] == reference[0]
    assert engine._process.is_alive()

"""DecoderEngine (the router's own batching loop) over a fake step backend: no model, so what is
checked is the loop's duties: metrics that stay true when the engine goes idle, one failing row
failing alone, cancellation freeing the slot."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from backends.base import BURST_GAP_S, Capabilities, SamplingParams
from router.errors import Internal, RouterError
from router.scheduler.engine import DecoderEngine
from router.scheduler.generation import Chunk, EngineLimits
from router.scheduler.request import Request, RequestStatus

VOCAB = 32
EOS = 2
NEXT = 7
"""The token the fake model always predicts (greedy)."""
POISON = 13
"""A prompt holding this token makes every later decode of its slot fail."""

_ids = itertools.count(1)


class FakeStepEngine:
    """A DecoderStepEngine whose logits always pick NEXT; decoding a slot whose prompt held
    POISON fails (with or without other rows in the batch)."""

    def __init__(self, max_slots: int = 4) -> None:
        self.gate: threading.Event | None = None
        """Set to a closed event, decode calls wait for it to open (`blocked` says one is
        waiting): a test reads the engine's state between two steps."""
        self.blocked = threading.Event()
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=True,
            device="test",
            max_batch=max_slots,
            context_length=256,
        )
        self.vocab_size = VOCAB
        self.max_slots = max_slots
        self.max_context = 256
        self.poisoned: set[int] = set()
        self.released: list[int] = []

    def _logits(self, rows: int) -> np.ndarray:
        logits = np.zeros((rows, VOCAB), dtype=np.float32)
        logits[:, NEXT] = 10.0
        return logits

    def prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        if POISON in token_ids.tolist():
            self.poisoned.add(slot)
        return self._logits(1)[0]

    def decode(self, slots: np.ndarray, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.poisoned & {int(s) for s in slots}:
            raise RuntimeError("poisoned slot")
        if self.gate is not None:
            self.blocked.set()
            self.gate.wait(timeout=10)
        return self._logits(len(slots))

    def release(self, slot: int) -> None:
        self.poisoned.discard(slot)
        self.released.append(slot)


class CharDecoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class RecordingObserver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: list[tuple[int, int, int]] = []

    def on_step(self, batch_size: int, waiting: int, running: int, seconds: float) -> None:
        with self.lock:
            self.steps.append((batch_size, waiting, running))

    def on_prefix_cache(self, hit_tokens: int, prompt_tokens: int) -> None:
        return None

    def on_reply_fill(self, tokens: int) -> None:
        return None

    def last(self) -> tuple[int, int, int]:
        with self.lock:
            return self.steps[-1]


def make_request(prompt: tuple[int, ...] = (1, 3, 4), **params: object) -> Request:
    engine_id = next(_ids)
    return Request(
        request_id=f"r{engine_id}",
        engine_id=engine_id,
        prompt_ids=list(prompt),
        params=SamplingParams(temperature=0.0, **params),  # type: ignore[arg-type]
    )


def make_engine(
    backend: FakeStepEngine, observer: RecordingObserver | None = None
) -> DecoderEngine:
    limits = EngineLimits(
        max_slots=backend.max_slots, token_budget=64, max_waiting=8, max_context=256
    )
    engine = DecoderEngine("fake", backend, CharDecoder(), limits, [EOS], observer)
    engine.start()
    return engine


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def collect(engine: DecoderEngine, request: Request) -> list[Chunk]:
    return [chunk async for chunk in engine.generate(request)]


async def test_a_burst_arriving_while_idle_starts_in_one_step() -> None:
    """Requests a millisecond apart share the idle engine's first step. A try counts only if
    they really reached the engine that close: a loaded machine can stretch a 1 ms sleep past
    the engine's wait, which says nothing of the gathering."""
    observer = RecordingObserver()
    engine = make_engine(FakeStepEngine(max_slots=4), observer)
    woken: list[tuple[float, float]] = []
    """Each wake-up of the engine thread: the times just before and just after it."""
    wake = engine._wake.set

    def timed() -> None:
        before = time.perf_counter()
        wake()
        woken.append((before, time.perf_counter()))

    def gaps() -> list[float]:
        """Upper bounds of the time between two arrivals (of the burst's 4 calls)."""
        return [after - before for (before, _), (_, after) in itertools.pairwise(woken[:4])]

    engine._wake.set = timed  # type: ignore[method-assign]
    try:
        for _ in range(5):
            # Idle in the engine thread too: it reports zero gauges just before it waits.
            await wait_until(lambda: observer.steps[-1:] == [(0, 0, 0)], "the engine is idle")
            with observer.lock:
                observer.steps.clear()
            woken.clear()
            calls = []
            for _ in range(4):
                calls.append(asyncio.create_task(collect(engine, make_request(max_tokens=3))))
                await asyncio.sleep(0.001)
            await asyncio.gather(*calls)
            if max(gaps()) < BURST_GAP_S / 2:
                break
        else:
            pytest.fail(f"5 bursts, none with its requests {BURST_GAP_S / 2 * 1000} ms apart")
        batches = [batch for batch, _, _ in observer.steps if batch]
        assert batches[0] == 4, (batches, gaps())
    finally:
        engine.stop()


async def test_gauges_are_zero_once_the_last_stream_is_cancelled() -> None:
    observer = RecordingObserver()
    backend = FakeStepEngine()
    backend.gate = threading.Event()  # the first decode step waits: the request stays running
    engine = make_engine(backend, observer)
    try:
        stream = engine.generate(make_request(max_tokens=200, ignore_eos=True))
        await anext(stream)
        # The next step is under way, so the first one's gauges were reported.
        assert await asyncio.to_thread(backend.blocked.wait, 10)
        assert observer.last()[2] == 1  # one request running
        await stream.aclose()  # the client went away; no other call comes
        backend.gate.set()
        await wait_until(lambda: engine.num_active == 0, "the engine dropped the request")
        await wait_until(lambda: observer.last() == (0, 0, 0), "the gauges read idle")
    finally:
        backend.gate.set()
        engine.stop()


async def test_gauges_are_zero_after_the_last_request_finishes() -> None:
    observer = RecordingObserver()
    engine = make_engine(FakeStepEngine(), observer)
    try:
        chunks = await collect(engine, make_request(max_tokens=3))
        assert chunks[-1].status == RequestStatus.FINISHED_LENGTH
        await wait_until(lambda: observer.last() == (0, 0, 0), "the gauges read idle")
    finally:
        engine.stop()


async def test_one_failing_row_fails_alone() -> None:
    backend = FakeStepEngine()
    engine = make_engine(backend)
    try:
        healthy = asyncio.create_task(collect(engine, make_request(max_tokens=50, ignore_eos=True)))
        doomed = asyncio.create_task(
            collect(engine, make_request((1, POISON, 4), max_tokens=50, ignore_eos=True))
        )
        results = await asyncio.gather(healthy, doomed, return_exceptions=True)
        ok, failed = results
        assert isinstance(ok, list)
        assert ok[-1].status == RequestStatus.FINISHED_LENGTH
        assert sum(len(c.token_ids) for c in ok) == 50
        assert isinstance(failed, Internal)
        assert "decode failed" in str(failed)
        assert isinstance(failed, RouterError)
        await wait_until(lambda: sorted(backend.released) == [0, 1], "both slots were freed")
        assert engine.num_active == 0
    finally:
        engine.stop()


@pytest.mark.parametrize("max_tokens", [1, 5])
async def test_max_tokens_is_exact(max_tokens: int) -> None:
    engine = make_engine(FakeStepEngine())
    try:
        chunks = await collect(engine, make_request(max_tokens=max_tokens, ignore_eos=True))
        assert [t for c in chunks for t in c.token_ids] == [NEXT] * max_tokens
        assert "".join(c.text for c in chunks) == CharDecoder().decode([NEXT]) * max_tokens
    finally:
        engine.stop()

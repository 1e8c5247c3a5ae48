"""The engine thread computing finished replies into the prefix cache while idle
(scheduler.ReplyFill), over a fake engine whose "KV" is the token ids and whose next token is a
hash of everything in the slot: a fill writing into a slot in use, or a cached block that does
not hold its key's tokens, changes an answer."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from backends.base import Capabilities, SamplingParams
from router.scheduler import engine as engine_module
from router.scheduler.engine import DecoderEngine
from router.scheduler.generation import EngineLimits
from router.scheduler.request import Request

VOCAB, EOS, CONTEXT = 40, 2, 256
_ids = itertools.count(1)


def next_token(seq: np.ndarray) -> int:
    digest = hashlib.blake2b(np.ascontiguousarray(seq, np.int64).tobytes(), digest_size=4)
    x = int.from_bytes(digest.digest(), "little")
    return EOS if x % 23 == 0 else 3 + x % (VOCAB - 3)


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model answers, computed without an engine."""
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        token = next_token(np.array(seq))
        out.append(token)
        seq.append(token)
        if token == EOS:
            break
    return out


class HashKV:
    """A DecoderStepEngine and PrefixKVStore whose slots hold token ids for KV."""

    def __init__(self, slots: int = 3, delay: float = 0.0) -> None:
        self.capabilities = Capabilities(True, False, True, "test", slots, CONTEXT)
        self.vocab_size, self.max_slots, self.max_context = VOCAB, slots, CONTEXT
        self.kv = np.full((slots, CONTEXT), -1, np.int64)
        self.lengths = [0] * slots
        self.pool = np.zeros((0, 0), np.int64)
        self.block_size = 0
        self.delay = delay

    def kv_bytes_per_token(self) -> int:
        return 8

    def open_pool(self, num_blocks: int, block_size: int) -> None:
        self.pool, self.block_size = np.full((num_blocks, block_size), -1, np.int64), block_size

    def save_blocks(self, blocks: Sequence[int], slot: int, start: int) -> None:
        size = self.block_size
        assert start + len(blocks) * size <= self.lengths[slot]
        for i, block in enumerate(blocks):
            self.pool[block] = self.kv[slot, start + i * size : start + (i + 1) * size]

    def load_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        n = len(blocks) * self.block_size
        self.kv[slot, :n] = self.pool[list(blocks)].reshape(-1)
        self.lengths[slot] = n

    def slot_length(self, slot: int) -> int:
        return self.lengths[slot]

    def _logits(self, slot: int, end: int) -> np.ndarray:
        logits = np.zeros(VOCAB, np.float32)
        logits[next_token(self.kv[slot, :end])] = 10.0
        return logits

    def prefill(self, slot: int, token_ids: np.ndarray, start: int) -> np.ndarray:
        time.sleep(self.delay)
        assert 0 <= start <= self.lengths[slot], (slot, start, self.lengths[slot])
        self.kv[slot, start : start + len(token_ids)] = token_ids
        self.lengths[slot] = start + len(token_ids)
        return self._logits(slot, start + len(token_ids))

    def decode(self, slots: np.ndarray, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = []
        rows = zip(slots.tolist(), token_ids.tolist(), positions.tolist(), strict=True)
        for slot, token, position in rows:
            assert position <= self.lengths[slot]
            self.kv[slot, position] = token
            self.lengths[slot] = position + 1
            out.append(self._logits(slot, position + 1))
        return np.stack(out)

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.kv[slot] = -1


class Codec:
    """One letter a token (id % 26); "ab" encodes back as the one token 28, as a real tokenizer
    may merge what the model generated as two."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids if not skip_special_tokens or i != EOS)

    def encode(self, sequence: str, add_special_tokens: bool = True) -> Any:
        ids, i = [], 0
        while i < len(sequence):
            if sequence.startswith("ab", i):
                ids.append(28)
                i += 2
            else:
                ids.append(ord(sequence[i]) - ord("a"))
                i += 1
        return SimpleNamespace(ids=ids)


def make(backend: HashKV, codec: Codec | None = None) -> DecoderEngine:
    limits = EngineLimits(backend.max_slots, 64, 16, CONTEXT, 0.0, 1 << 20)
    engine = DecoderEngine("fake", backend, codec or Codec(), limits, [EOS])  # type: ignore[arg-type]
    engine.start()
    return engine


async def ask(
    engine: DecoderEngine, prompt: list[int], max_tokens: int, **params: Any
) -> list[int]:
    engine_id = next(_ids)
    request = Request(
        request_id=f"r{engine_id}",
        engine_id=engine_id,
        prompt_ids=prompt,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
    )
    return [t async for chunk in engine.generate(request) for t in chunk.token_ids]


def logged_fills(engine: DecoderEngine) -> list[str]:
    """A list the engine's runner appends "fill" to at each reply chunk it computes."""
    calls: list[str] = []
    fill = engine._runner.fill

    def logged_fill(*args: Any) -> None:
        calls.append("fill")
        fill(*args)

    engine._runner.fill = logged_fill  # type: ignore[method-assign]
    return calls


async def test_conversations_with_pauses_and_cancelled_calls_answer_as_the_model_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "FILL_AFTER_S", 0.0)  # fills in the shortest pauses too
    rng = random.Random(4)
    engine = make(HashKV(slots=3, delay=0.002))
    codec = Codec()

    async def conversation(k: int) -> None:
        history = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 30))]
        for turn in range(5):
            n = rng.randrange(1, 40)
            if rng.random() < 0.2:  # a client that goes away mid-answer
                engine_id = next(_ids)
                params = SamplingParams(max_tokens=n, temperature=0.0)
                stream = engine.generate(Request(f"c{engine_id}", engine_id, history, params))
                async for _ in stream:
                    break
                await stream.aclose()
            out = await ask(engine, history, n)
            assert out == reference(history, n), (k, turn)
            reply = codec.encode(codec.decode(out)).ids + ([EOS] if out[-1:] == [EOS] else [])
            question = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 12))]
            history = (history + reply + question)[-(CONTEXT - 60) :]
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01, 0.05]))

    try:
        await asyncio.gather(*(conversation(k) for k in range(6)))
        assert engine.prefix_cache is not None and engine.prefix_cache.hit_tokens > 0
    finally:
        engine.stop()


async def test_a_call_arriving_during_fills_waits_for_one_chunk_at_most() -> None:
    engine = make(HashKV(slots=2, delay=0.02))
    calls = logged_fills(engine)
    try:
        await ask(engine, [5] * 10, 200, ignore_eos=True)  # a long reply: many chunks
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:  # its fills have begun
            await asyncio.sleep(0.005)
        assert calls
        calls.append("arrive")
        assert await ask(engine, [7] * 5, 3) == reference([7] * 5, 3)
        assert calls[calls.index("arrive") + 1 :].count("fill") <= 1, calls
    finally:
        engine.stop()


async def test_a_call_sent_at_once_after_a_reply_waits_for_no_fill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "FILL_AFTER_S", 5.0)  # "at once", however slow the CI
    engine = make(HashKV(slots=2, delay=0.02))
    calls = logged_fills(engine)
    try:
        first = await ask(engine, [5] * 10, 40, ignore_eos=True)
        prompt = [5] * 10 + first + [9, 9]  # the next turn, sent at once (an agent's loop)
        assert await ask(engine, prompt, 3) == reference(prompt, 3)
        assert calls == []  # the fills wait FILL_AFTER_S of idleness first
    finally:
        engine.stop()


async def test_stopping_with_fills_pending_ends_the_thread() -> None:
    engine = make(HashKV(slots=2, delay=0.05))
    await ask(engine, [5] * 10, 200, ignore_eos=True)
    assert engine.pending_fills
    engine.stop()
    assert engine._thread is not None and not engine._thread.is_alive()


async def test_a_failure_computing_a_reply_for_the_cache_keeps_the_engine_serving() -> None:
    class Broken(Codec):
        def encode(self, sequence: str, add_special_tokens: bool = True) -> Any:
            raise RuntimeError("tokenizer failed")

    engine = make(HashKV(slots=2), Broken())
    try:
        await ask(engine, [5] * 10, 20, ignore_eos=True)
        deadline = time.monotonic() + 5
        while engine.pending_fills and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.pending_fills == 0  # dropped, logged
        assert await asyncio.wait_for(ask(engine, [6] * 10, 3), 5) == reference([6] * 10, 3)
    finally:
        engine.stop()

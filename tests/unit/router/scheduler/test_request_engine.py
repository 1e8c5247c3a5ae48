"""RequestEngineAdapter over a scripted request engine: the router-side duties (UTF-8 text, stop
strings and tokens, max_tokens, load shedding, error mapping, cancellation) without a model.
The OpenVINO engine itself is tested in tests/unit/backends/test_openvino_pipeline.py."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from backends.base import (
    Capabilities,
    GenerationChunk,
    GenerationRequest,
    RequestEngine,
    SamplingParams,
    UnsupportedParameter,
)
from router.errors import Internal, InvalidArgument, ResourceExhausted
from router.scheduler.generation import Chunk, EngineLimits
from router.scheduler.request import Priority, Request, RequestStatus
from router.scheduler.request_engine import RequestEngineAdapter

EOS = 2


class ScriptedEngine:
    """A RequestEngine that streams fixed pieces: chunks of token ids (or text), in order."""

    def __init__(
        self,
        pieces: list[tuple[int, ...]],
        *,
        finish: str | None = "length",
        texts: list[str] | None = None,
        fail: Exception | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=True,
            device="test",
            max_batch=2,
            context_length=512,
            text_output=texts is not None,
        )
        self.vocab_size = 49152
        self.max_slots = 2
        self.max_context = 512
        self.pieces = pieces
        self.texts = texts
        self.finish = finish
        self.fail = fail
        self.gate = gate
        self.received: list[GenerationRequest] = []
        self.cancelled = 0
        self.active = 0

    @property
    def num_active(self) -> int:
        return self.active

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.received.append(request)
        if self.fail is not None:
            raise self.fail
        self.active += 1
        done = False
        try:
            if self.gate is not None:
                await self.gate.wait()
            for i, ids in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                text = self.texts[i] if self.texts is not None else None
                done = last and self.finish is not None
                yield GenerationChunk(ids, text, self.finish if last else None)
        finally:
            self.active -= 1
            if not done:
                self.cancelled += 1


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_cache / "smollm2-135m-instruct" / "tokenizer.json"))


def make_adapter(
    tokenizer: Tokenizer, engine: ScriptedEngine, max_slots: int = 2, max_waiting: int = 1
) -> RequestEngineAdapter:
    assert isinstance(engine, RequestEngine)
    limits = EngineLimits(max_slots, token_budget=64, max_waiting=max_waiting, max_context=512)
    return RequestEngineAdapter("scripted", engine, tokenizer, limits, stop_ids=[EOS])


_ids = itertools.count(1)


def make_request(*, priority: Priority = Priority.NORMAL, **params: object) -> Request:
    engine_id = next(_ids)
    return Request(
        request_id=f"r{engine_id}",
        engine_id=engine_id,
        prompt_ids=[1, 2, 3],
        params=SamplingParams(**params),  # type: ignore[arg-type]
        priority=priority,
        seed=7,
        prompt_text="abc",
    )


def split(ids: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]


async def collect(adapter: RequestEngineAdapter, request: Request) -> list[Chunk]:
    return [chunk async for chunk in adapter.generate(request)]


async def test_ids_become_whole_utf8_text(tokenizer: Tokenizer) -> None:
    text = "Tokyo 東京タワー 🙂👍🏽 café"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    engine = ScriptedEngine([(t,) for t in ids])
    chunks = await collect(make_adapter(tokenizer, engine), make_request(max_tokens=100))
    assert all("\ufffd" not in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == text
    assert [t for c in chunks for t in c.token_ids] == ids
    assert chunks[-1].status == RequestStatus.FINISHED_LENGTH
    assert all(c.status == RequestStatus.RUNNING for c in chunks[:-1])


async def test_sampling_reaches_the_engine(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine([(5,)])
    request = make_request(temperature=0.7, top_k=40, min_p=0.1, stop=("x",), max_tokens=9)
    await collect(make_adapter(tokenizer, engine), request)
    sent = engine.received[0]
    assert (sent.prompt_ids, sent.prompt, sent.seed) == ((1, 2, 3), "abc", 7)
    assert (sent.temperature, sent.top_k, sent.min_p, sent.stop, sent.max_tokens) == (
        0.7,
        40,
        0.1,
        ("x",),
        9,
    )


async def test_stop_string_cuts_the_text_and_cancels_the_engine(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The answer is 42. Stop here. More text.", add_special_tokens=False).ids
    engine = ScriptedEngine(split(ids, 3))
    request = make_request(max_tokens=100, stop=("Stop",))
    chunks = await collect(make_adapter(tokenizer, engine), request)
    assert "".join(c.text for c in chunks) == "The answer is 42. "
    assert chunks[-1].status == RequestStatus.FINISHED_STOPPED
    assert engine.cancelled == 1 and engine.active == 0


async def test_text_engine_gets_stop_strings_applied_on_its_text(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine([(11,), (12,), (13,)], texts=["Hello wo", "rld, EN", "D and more"])
    request = make_request(max_tokens=100, stop=("END",))
    chunks = await collect(make_adapter(tokenizer, engine), request)
    assert "".join(c.text for c in chunks) == "Hello world, "
    assert chunks[-1].status == RequestStatus.FINISHED_STOPPED


async def test_max_tokens_cuts_an_engine_that_runs_past_it(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False).ids
    engine = ScriptedEngine(split(ids, 4))
    chunks = await collect(make_adapter(tokenizer, engine), make_request(max_tokens=3))
    assert [t for c in chunks for t in c.token_ids] == ids[:3]
    assert chunks[-1].status == RequestStatus.FINISHED_LENGTH
    assert "".join(c.text for c in chunks) == tokenizer.decode(ids[:3])
    assert engine.cancelled == 1


@pytest.mark.parametrize(
    ("params", "stops"),
    [({}, True), ({"ignore_eos": True}, False), ({"stop_token_ids": (9,)}, True)],
)
async def test_end_and_stop_tokens(
    tokenizer: Tokenizer, params: dict[str, object], stops: bool
) -> None:
    stop = 9 if "stop_token_ids" in params else EOS
    engine = ScriptedEngine([(100, 101), (stop, 102)], finish="length")
    chunks = await collect(make_adapter(tokenizer, engine), make_request(max_tokens=10, **params))
    tokens = [t for c in chunks for t in c.token_ids]
    if stops:
        assert tokens == [100, 101, stop] and chunks[-1].status == RequestStatus.FINISHED_STOPPED
    else:
        assert tokens == [100, 101, stop, 102]
        assert chunks[-1].status == RequestStatus.FINISHED_LENGTH


async def test_engine_finish_reason_stop(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine([(100,), (101,)], finish="stop")
    chunks = await collect(make_adapter(tokenizer, engine), make_request(max_tokens=10))
    assert chunks[-1].status == RequestStatus.FINISHED_STOPPED


async def test_sheds_past_max_slots_plus_max_waiting(tokenizer: Tokenizer) -> None:
    gate = asyncio.Event()
    engine = ScriptedEngine([(100,)], gate=gate)
    adapter = make_adapter(tokenizer, engine, max_slots=2, max_waiting=1)
    streams = [adapter.generate(make_request(max_tokens=5)) for _ in range(3)]
    pending = [asyncio.ensure_future(anext(s)) for s in streams]
    await asyncio.sleep(0.01)
    # Two run in the engine (max_slots), the third waits in the adapter.
    assert adapter.num_unfinished == 3 and adapter.num_active == 2
    with pytest.raises(ResourceExhausted, match=r"max_slots 2 \+ max_waiting 1"):
        await anext(adapter.generate(make_request(max_tokens=5)))
    gate.set()
    assert all(c.status == RequestStatus.FINISHED_LENGTH for c in await asyncio.gather(*pending))
    for s in streams:
        await s.aclose()
    assert adapter.num_unfinished == 0 and adapter.num_active == 0


async def test_waiting_requests_enter_the_engine_by_priority(tokenizer: Tokenizer) -> None:
    gate = asyncio.Event()
    engine = ScriptedEngine([(100,)], gate=gate)
    adapter = make_adapter(tokenizer, engine, max_slots=1, max_waiting=4)
    first = make_request(max_tokens=5)
    low = make_request(priority=Priority.LOW, max_tokens=5)
    normal = make_request(max_tokens=5)
    high = make_request(priority=Priority.HIGH, max_tokens=5)
    gone = make_request(priority=Priority.HIGH, max_tokens=5)
    tasks = [asyncio.ensure_future(collect(adapter, r)) for r in (first, low, normal, high)]
    await asyncio.sleep(0.01)
    left = asyncio.ensure_future(collect(adapter, gone))
    await asyncio.sleep(0.01)
    left.cancel()  # cancelled while waiting: never reaches the engine
    await asyncio.sleep(0.01)
    assert [r.request_id for r in engine.received] == [first.request_id]
    gate.set()
    await asyncio.gather(*tasks)
    order = [r.request_id for r in engine.received]
    assert order == [first.request_id, high.request_id, normal.request_id, low.request_id]
    assert gone.status == RequestStatus.FINISHED_CANCELLED
    assert adapter.num_unfinished == 0 and adapter._admitted == 0


async def test_closing_early_cancels_in_the_engine(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine([(100,), (101,), (102,)])
    adapter = make_adapter(tokenizer, engine)
    request = make_request(max_tokens=10)
    stream = adapter.generate(request)
    await anext(stream)
    await stream.aclose()
    assert engine.cancelled == 1 and adapter.num_unfinished == 0
    assert request.status == RequestStatus.FINISHED_CANCELLED


async def test_unsupported_parameter_is_invalid_argument_naming_the_field(
    tokenizer: Tokenizer,
) -> None:
    engine = ScriptedEngine([], fail=UnsupportedParameter("min_p", "min_p=0.5 is not supported"))
    with pytest.raises(InvalidArgument, match=r"sampling\.min_p") as info:
        await collect(make_adapter(tokenizer, engine), make_request())
    assert info.value.field == "sampling.min_p"


async def test_engine_failure_is_internal_and_frees_the_call(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine([], fail=RuntimeError("device lost"))
    adapter = make_adapter(tokenizer, engine)
    with pytest.raises(Internal, match="failed this request"):
        await collect(adapter, make_request())
    assert adapter.num_unfinished == 0


async def test_engine_that_ends_without_finishing_is_internal(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine([(100,)], finish=None)
    with pytest.raises(Internal, match="without a finish reason"):
        await collect(make_adapter(tokenizer, engine), make_request(max_tokens=10))

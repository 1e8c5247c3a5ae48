"""Contract tests of the TensorRT-LLM request engine.

TensorRT-LLM cannot run here (no CUDA host), so the engine is tested against a double that
follows TensorRT-LLM's documented LLM API contract, as its own source implements it
(tensorrt_llm/executor/result.py): `generate_async(inputs, sampling_params, streaming=True)`
returns a result that is an async iterator over itself; each step extends
`outputs[0].token_ids` after moving `_last_token_ids_len` to the old length (so
`token_ids_diff` is the step's tokens); once `finished`, `finish_reason` is 'stop' (end id or a
stop token), 'length', 'timeout' or 'cancelled' (after `abort()`). `SamplingParams` accepts
keyword arguments only, from the documented list. These are contract tests: they prove the
mapping and the life cycle, not the engine on hardware."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.base import GenerationRequest, RequestEngine
from backends.tensorrt_llm import INSTALL_HINT, TensorRTLLMEngine, TensorRTLLMUnavailable, load_llm

# The documented keyword arguments of tensorrt_llm.SamplingParams (LLM API reference).
DOCUMENTED_PARAMS = {
    "end_id", "pad_id", "max_tokens", "bad", "bad_token_ids", "stop", "stop_token_ids",
    "include_stop_str_in_output", "embedding_bias", "logits_processor",
    "apply_batched_logits_processor", "n", "best_of", "use_beam_search", "logprobs_mode",
    "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed", "temperature",
    "min_tokens", "beam_search_diversity_rate", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "prompt_ignore_length", "length_penalty", "early_stopping",
    "no_repeat_ngram_size", "min_p", "beam_width_array", "logprobs", "prompt_logprobs",
    "ignore_eos", "detokenize", "add_special_tokens", "truncate_prompt_tokens",
}  # fmt: skip
EOS = 2


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - DOCUMENTED_PARAMS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = kwargs


class Completion:
    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self._last_token_ids_len = 0
        self.finish_reason: str | None = None

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]


class Result:
    """GenerationResult's streaming contract over a scripted token sequence."""

    def __init__(self, llm: FakeLLM, script: list[int], params: SamplingParams) -> None:
        self._llm = llm
        self._script = iter(script)
        self._params = params.kwargs
        self.outputs = [Completion()]
        self._done = False
        self.aborted = False

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self.aborted = True
        self._llm.aborted += 1

    def __aiter__(self) -> Result:
        return self

    async def __anext__(self) -> Result:
        if self._done:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        out = self.outputs[0]
        out._last_token_ids_len = len(out.token_ids)
        if self.aborted:
            self._done, out.finish_reason = True, "cancelled"
            return self
        token = next(self._script, None)
        if token is None:
            self._done, out.finish_reason = True, self._llm.end_reason
            return self
        out.token_ids.append(token)
        stops = set(self._params.get("stop_token_ids") or ())
        if token in stops or (token == EOS and not self._params.get("ignore_eos")):
            self._done, out.finish_reason = True, "stop"
        elif len(out.token_ids) >= self._params["max_tokens"]:
            self._done, out.finish_reason = True, "length"
        return self


class FakeLLM:
    def __init__(self, script: list[int], end_reason: str = "timeout") -> None:
        self.script = script
        self.end_reason = end_reason
        self.calls: list[tuple[list[int], SamplingParams]] = []
        self.aborted = 0
        self.shut_down = 0

    def generate_async(
        self, inputs: list[int], sampling_params: SamplingParams, streaming: bool = False
    ) -> Result:
        assert isinstance(inputs, list) and all(isinstance(t, int) for t in inputs)
        assert streaming, "the engine must stream"
        self.calls.append((inputs, sampling_params))
        return Result(self, self.script, sampling_params)

    def shutdown(self) -> None:
        self.shut_down += 1


def engine(llm: FakeLLM) -> TensorRTLLMEngine:
    return TensorRTLLMEngine(llm, SamplingParams, vocab_size=100, max_slots=4, max_context=64)


def request(**fields: Any) -> GenerationRequest:
    fields.setdefault("max_tokens", 8)
    return GenerationRequest(request_id="r1", prompt_ids=(1, 5, 6), prompt="hi", **fields)


async def collect(e: TensorRTLLMEngine, r: GenerationRequest) -> list[Any]:
    return [chunk async for chunk in e.generate(r)]


def test_it_is_a_request_engine() -> None:
    assert isinstance(engine(FakeLLM([])), RequestEngine)
    caps = engine(FakeLLM([])).capabilities
    assert caps.generate and caps.stream and not caps.text_output and not caps.stop_strings


async def test_sampling_fields_map_to_documented_names() -> None:
    llm = FakeLLM(list(range(10, 30)))
    e = engine(llm)
    full = request(
        max_tokens=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        stop=("END",),
        stop_token_ids=(7,),
        seed=42,
        ignore_eos=True,
    )
    await collect(e, full)
    inputs, params = llm.calls[0]
    assert inputs == [1, 5, 6]
    assert params.kwargs == {
        "max_tokens": 2,
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "stop_token_ids": [7],
        "seed": 42,
        "ignore_eos": True,
        "detokenize": False,  # stop strings and text stay with the router
    }
    await collect(e, request(temperature=0.0))
    _, greedy = llm.calls[1]
    disabled = ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty")
    assert all(greedy.kwargs[k] is None for k in disabled)
    assert greedy.kwargs["stop_token_ids"] is None and greedy.kwargs["temperature"] == 0.0


async def test_tokens_stream_as_diffs_and_finish_with_a_reason() -> None:
    e = engine(FakeLLM([10, 11, 12, 13]))
    chunks = await collect(e, request(max_tokens=3))
    assert [c.token_ids for c in chunks] == [(10,), (11,), (12,)]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert all(c.text is None for c in chunks)
    chunks = await collect(engine(FakeLLM([10, EOS, 12])), request())
    assert chunks[-1].token_ids == (EOS,) and chunks[-1].finish_reason == "stop"
    chunks = await collect(engine(FakeLLM([10, 7, 12])), request(stop_token_ids=(7,)))
    assert chunks[-1].finish_reason == "stop" and len(chunks) == 2


async def test_closing_the_iterator_aborts_the_request() -> None:
    llm = FakeLLM(list(range(10, 60)))
    e = engine(llm)
    stream = e.generate(request(max_tokens=40))
    first = await anext(stream)
    assert first.token_ids == (10,) and e.num_active == 1
    await stream.aclose()
    assert llm.aborted == 1 and e.num_active == 0
    # A finished request is not aborted again.
    await collect(e, request(max_tokens=2))
    assert llm.aborted == 1


async def test_an_unusable_finish_reason_is_an_error_naming_it() -> None:
    e = engine(FakeLLM([10], end_reason="timeout"))
    with pytest.raises(RuntimeError, match="finish_reason 'timeout'"):
        await collect(e, request(max_tokens=5))
    assert e.num_active == 0


async def test_stop_shuts_the_llm_down_once_and_refuses_new_requests() -> None:
    llm = FakeLLM([10])
    e = engine(llm)
    e.start()
    e.stop()
    e.stop()
    assert llm.shut_down == 1
    with pytest.raises(RuntimeError, match="stopped"):
        await collect(e, request())


def test_without_tensorrt_llm_the_error_names_the_install_step() -> None:
    # The real import: TensorRT-LLM is not installable on these machines.
    with pytest.raises(TensorRTLLMUnavailable) as info:
        load_llm("/models/llama")
    assert INSTALL_HINT in str(info.value) and "pip install tensorrt-llm" in str(info.value)

"""TensorRT-LLM in process, through its LLM API: a request engine (backends.base).

UNVERIFIED ON HARDWARE. TensorRT-LLM needs a CUDA host with NVIDIA's wheels; neither these
development machines nor the lent GPU machines can install it. This module is written against
the documented LLM API (`tensorrt_llm.LLM`, `LLM.generate_async(inputs, sampling_params,
streaming=True)` returning a `RequestOutput` that is an async iterator over itself, whose
`outputs[0]` carries the cumulative `token_ids` with `token_ids_diff` for the newest ones and a
`finish_reason` of 'stop', 'length', 'timeout' or 'cancelled' once `finished`; `abort()`;
`LLM.shutdown()`; `SamplingParams(max_tokens, temperature, top_k, top_p, min_p,
repetition_penalty, presence_penalty, frequency_penalty, stop_token_ids, seed, ignore_eos,
detokenize, ...)`) and tested against a double that follows that contract
(tests/unit/backends/test_tensorrt_llm_contract.py). TensorRT-LLM deployments are served for
real through the remote engines (trtllm-serve speaks the OpenAI HTTP API).

Token ids in, token ids out: the router tokenizes the prompt and detokenizes the stream with its
own tokenizer (`detokenize=False`), and applies stop strings itself, so every backend streams
the same text for the same tokens."""

from __future__ import annotations

import importlib
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from backends.base import Capabilities, GenerationChunk, GenerationRequest

INSTALL_HINT = (
    "TensorRT-LLM is not installed in this environment. On a CUDA host (Linux x86_64 or aarch64, "
    "an NVIDIA GPU with a matching driver): `pip install tensorrt-llm` from NVIDIA's package "
    "index (see https://nvidia.github.io/TensorRT-LLM/installation/linux.html); or serve the "
    "model with `trtllm-serve` and use the remote OpenAI HTTP backend instead."
)

_FINISH = {"stop": "stop", "length": "length"}


class TensorRTLLMUnavailable(RuntimeError):
    """tensorrt_llm cannot be imported here; the message names the install step."""


def load_llm(model: str | Path, **llm_args: Any) -> tuple[Any, Callable[..., Any]]:
    """(tensorrt_llm.LLM(model, **llm_args), tensorrt_llm.SamplingParams), imported lazily so
    the router starts without TensorRT-LLM and only this model fails."""
    try:
        trtllm = importlib.import_module("tensorrt_llm")
    except ImportError as exc:
        raise TensorRTLLMUnavailable(f"{INSTALL_HINT} (import failed: {exc})") from None
    return trtllm.LLM(model=str(model), **llm_args), trtllm.SamplingParams


class TensorRTLLMEngine:
    """A RequestEngine over one `tensorrt_llm.LLM`. The LLM batches in flight itself; this
    class maps requests and streams, and aborts a request whose iterator is closed."""

    def __init__(
        self,
        llm: Any,
        sampling_params: Callable[..., Any],
        *,
        vocab_size: int,
        max_slots: int,
        max_context: int,
        device: str = "cuda",
    ) -> None:
        self._llm = llm
        self._sampling_params = sampling_params
        self.vocab_size = vocab_size
        self.max_slots = max_slots
        self.max_context = max_context
        self.capabilities = Capabilities(
            generate=True,
            embed=False,
            stream=True,
            device=device,
            max_batch=max_slots,
            context_length=max_context,
            text_output=False,  # detokenize=False: the router detokenizes the ids
            stop_strings=False,  # the router applies stop strings to the text
        )
        self._active = 0
        self._stopped = False

    @property
    def num_active(self) -> int:
        return self._active

    def start(self) -> None:
        """Nothing to start: the LLM's executor runs from construction."""

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._llm.shutdown()

    def sampling_params(self, request: GenerationRequest) -> Any:
        """Our request's fields → TensorRT-LLM's SamplingParams (their names are the same;
        'disabled' values become None, TensorRT-LLM's own 'unset')."""
        return self._sampling_params(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_k=request.top_k or None,
            top_p=request.top_p if request.top_p < 1.0 else None,
            min_p=request.min_p or None,
            repetition_penalty=(
                request.repetition_penalty if request.repetition_penalty != 1.0 else None
            ),
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
            stop_token_ids=list(request.stop_token_ids) or None,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            detokenize=False,
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self._stopped:
            raise RuntimeError("the TensorRT-LLM engine is stopped")
        params = self.sampling_params(request)
        output = self._llm.generate_async(list(request.prompt_ids), params, streaming=True)
        self._active += 1
        try:
            async for result in output:
                completion = result.outputs[0]
                ids = tuple(int(t) for t in completion.token_ids_diff)
                if not result.finished:
                    if ids:
                        yield GenerationChunk(ids)
                    continue
                reason = completion.finish_reason
                if reason not in _FINISH:
                    raise RuntimeError(
                        f"TensorRT-LLM ended request {request.request_id} with finish_reason "
                        f"{reason!r}"
                    )
                yield GenerationChunk(ids, None, _FINISH[reason])
                return
            raise RuntimeError(
                f"TensorRT-LLM's stream for request {request.request_id} ended unfinished"
            )
        finally:
            self._active -= 1
            if not output.finished:
                output.abort()  # the caller closed the iterator, or an error: free the slot

"""A text-generation model served by KServe's own ModelServer (the `kserve` package), for the
KServe v2 engine's tests. It runs inside build/kserve-venv (kserve pins other grpcio and protobuf
versions than the router's venv), started by tests/kserve_server.py:

    build/kserve-venv/bin/python tests/kserve_model.py --gguf X.gguf --model_name smollm2 \
        --http_port P --grpc_port Q

Inputs follow Triton's TensorRT-LLM ensemble: `text_input` (BYTES), `max_tokens` (INT32),
`stream` (BOOL, ignored: KServe has no streaming gRPC call), and optional `temperature`,
`top_p`, `top_k`, `random_seed`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`.
Outputs: `text_output` (BYTES, the completion only), `finish_reason` (BYTES), and Triton's vLLM
backend's `num_input_tokens` / `num_output_tokens` (INT32). llama.cpp generates, one request at
a time; a cancelled RPC stops its generation at the next token and prints
`request <id> cancelled after <n> tokens`.

`completion_kwargs` is importable without kserve, so a test can ask llama.cpp for the same
completion in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from collections.abc import Mapping
from typing import Any

DEFAULTS: Mapping[str, Any] = {
    "max_tokens": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "random_seed": 0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def completion_kwargs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """llama_cpp.Llama.create_completion arguments for the model's inputs (name → scalar),
    neutral where an input is absent (llama.cpp's own defaults of top_k 40, min_p 0.05 and
    repeat_penalty 1.1 are not)."""
    value = {**DEFAULTS, **inputs}
    return {
        "max_tokens": int(value["max_tokens"]),
        "temperature": float(value["temperature"]),
        "top_p": float(value["top_p"]),
        "top_k": int(value["top_k"]),
        "min_p": 0.0,
        "repeat_penalty": float(value["repetition_penalty"]),
        "presence_penalty": float(value["presence_penalty"]),
        "frequency_penalty": float(value["frequency_penalty"]),
        "seed": int(value["random_seed"]) % 2**32,
    }


def serve(argv: list[str]) -> None:
    # Imported here: tests in the router's venv import completion_kwargs without kserve.
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.errors import InvalidInput
    from llama_cpp import Llama, StoppingCriteriaList

    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--model_name", default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n_ctx", type=int, default=2048)
    args, _ = parser.parse_known_args(argv)  # kserve reads its own (--http_port, ...)

    class LlamaTextModel(kserve.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(args.model_name)
            self.llm = Llama(
                model_path=args.gguf, n_ctx=args.n_ctx, n_threads=args.threads, verbose=False
            )
            self.lock = threading.Lock()  # a llama.cpp context runs one sequence at a time
            self.llm.create_completion("Hi", max_tokens=1)  # the first call pages the model in
            self.ready = True

        def _generate(
            self, request_id: str, prompt: str, kwargs: dict[str, Any], cancel: threading.Event
        ) -> dict[str, Any]:
            produced = 0

            def stop(_ids: Any, _logits: Any) -> bool:  # called once per generated token
                nonlocal produced
                produced += 1
                return cancel.is_set()

            with self.lock:
                if cancel.is_set():
                    return {}
                result: dict[str, Any] = self.llm.create_completion(
                    prompt, stopping_criteria=StoppingCriteriaList([stop]), **kwargs
                )
            if cancel.is_set():
                print(f"request {request_id} cancelled after {produced} tokens", flush=True)
            return result

        async def predict(
            self,
            payload: InferRequest,
            headers: dict[str, str] | None = None,
            response_headers: dict[str, str] | None = None,
        ) -> InferResponse:
            values = {i.name: i.as_numpy().reshape(-1)[0] for i in payload.inputs}
            if "text_input" not in values:
                raise InvalidInput("input 'text_input' (BYTES) is required")
            prompt = values.pop("text_input")
            prompt = prompt.decode() if isinstance(prompt, bytes) else str(prompt)
            values.pop("stream", None)
            unknown = sorted(set(values) - set(DEFAULTS))
            if unknown:
                raise InvalidInput(f"unknown inputs {unknown}")
            kwargs = completion_kwargs(values)
            if kwargs["max_tokens"] < 1:
                raise InvalidInput(f"max_tokens={kwargs['max_tokens']} < 1")
            cancel = threading.Event()
            print(f"request {payload.id} generating", flush=True)
            try:
                result = await asyncio.to_thread(self._generate, payload.id, prompt, kwargs, cancel)
            except BaseException:
                cancel.set()  # the RPC was cancelled: stop llama.cpp at its next token
                raise
            choice, usage = result["choices"][0], result["usage"]
            return InferResponse(
                response_id=payload.id,
                model_name=self.name,
                infer_outputs=[
                    InferOutput("text_output", [1, 1], "BYTES", [choice["text"].encode()]),
                    InferOutput("finish_reason", [1], "BYTES", [choice["finish_reason"].encode()]),
                    InferOutput("num_input_tokens", [1], "INT32", [usage["prompt_tokens"]]),
                    InferOutput("num_output_tokens", [1], "INT32", [usage["completion_tokens"]]),
                ],
            )

    model = LlamaTextModel()
    kserve.ModelServer(workers=1, grace_period=1).start([model])


if __name__ == "__main__":
    serve(sys.argv[1:])

"""The remote engine's cost: streamed tokens/s of one client straight to llama-cpp-python's
OpenAI server (httpx, SSE read by hand) against the same request through OpenAIHttpEngine in
process, and through a router process (`backend: openai_http`) called over gRPC, alternating on
one server in the same run. Goal for the router path: >= 0.95. Then the same model as a
deployment of one replica (routing: dispatcher, breaker, RoutedEngine per chunk) against the
plain model, in the same router.

    python -m loadtest.benchmarks.remote_bench [--quick] [--rounds N] [--max-tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx

from backends.base import GenerationRequest
from backends.openai.config import OpenAIHttpConfig
from backends.openai.engine import OpenAIHttpEngine
from backends.openai.wire import completion_body
from loadtest.benchmarks.serve_bench import router_process
from router.config_file import load_config
from router.models.prepare import prepare_models, smollm2_gguf_path
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from tests.openai_servers import llama_cpp_missing, running_llama_server

if TYPE_CHECKING:
    from router.proto.irouter.v1.inference_service_pb2_grpc import InferenceServiceAsyncStub

PROMPT = (
    "<|im_start|>user\nCount from 1 to 1000, separated by commas.<|im_end|>\n"
    "<|im_start|>assistant\n1, 2, 3,"
)
"""Greedy SmolLM2 keeps counting: every run streams exactly max_tokens tokens."""


@dataclass(frozen=True)
class Run:
    tokens: int
    """Streamed events that carried text (one per token on llama-cpp-python)."""
    ttft_s: float
    total_s: float
    cpu_s: float
    """CPU time of this process (the client side) during the run."""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.total_s


async def direct(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> Run:
    """The baseline: POST, read SSE lines, parse each event's JSON, keep the text."""
    t0, c0 = time.perf_counter(), time.process_time()
    ttft, tokens, parts = 0.0, 0, []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                tokens += 1
                ttft = ttft or time.perf_counter() - t0
                parts.append(text)
    return Run(tokens, ttft, time.perf_counter() - t0, time.process_time() - c0)


async def through_engine(engine: OpenAIHttpEngine, request: GenerationRequest) -> Run:
    t0, c0 = time.perf_counter(), time.process_time()
    ttft, tokens = 0.0, 0
    async for chunk in engine.generate(request):
        if chunk.text:
            tokens += 1
            ttft = ttft or time.perf_counter() - t0
    return Run(tokens, ttft, time.perf_counter() - t0, time.process_time() - c0)


def line(name: str, value: float, unit: str, baseline: float | None = None, goal: str = "") -> None:
    ratio = f"  ratio {value / baseline:6.3f}" if baseline else ""
    print(f"{name:<58} {value:10.2f} {unit:<8}{ratio}  {goal}", flush=True)


async def through_router(
    stub: InferenceServiceAsyncStub, max_tokens: int, model: str = "remote"
) -> Run:
    request = pb.GenerateRequest(
        model=model,
        prompt=PROMPT,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        cache_mode=pb.CACHE_MODE_BYPASS,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    ttft, tokens = 0.0, 0
    async for chunk in stub.Generate(request):
        if chunk.text:
            tokens += 1
            ttft = ttft or time.perf_counter() - t0
    return Run(tokens, ttft, time.perf_counter() - t0, time.process_time() - c0)


def router_config(tmp: Path, url: str, model: str) -> Path:
    path = tmp / "router.yaml"
    path.write_text(
        "retrieval: {enabled: false}\n"
        "models:\n"
        "  - name: remote\n"
        "    kind: generate\n"
        "    artifact: smollm2-135m-instruct\n"
        "    backend: openai_http\n"
        "    max_slots: 4\n"
        f"    remote: {{url: '{url}', model: {model}, dialect: llama.cpp, read_timeout_s: 120}}\n"
        "  - name: remote-behind\n"
        "    kind: generate\n"
        "    artifact: smollm2-135m-instruct\n"
        "    backend: openai_http\n"
        "    max_slots: 4\n"
        f"    remote: {{url: '{url}', model: {model}, dialect: llama.cpp, read_timeout_s: 120}}\n"
        "routing:\n"
        "  deployments:\n"
        "    - name: routed\n"
        "      model: remote-behind\n"
        "      health_check: {interval_s: 0}\n"
        f"      replicas: [{{name: r0, backend: openai_http, url: '{url}'}}]\n"
    )
    return path


async def bench(url: str, model: str, rounds: int, max_tokens: int, target: str) -> None:
    request = GenerationRequest(
        request_id="bench", prompt_ids=(), prompt=PROMPT, max_tokens=max_tokens, temperature=0.0
    )
    config = OpenAIHttpConfig(url=url, model=model, dialect="llama.cpp")
    body = completion_body(request, model=model, dialect="llama.cpp")
    engine = OpenAIHttpEngine(config)
    engine.start()
    runs: dict[str, list[Run]] = {"direct": [], "engine": [], "router": [], "routed": []}
    try:
        async with (
            httpx.AsyncClient(timeout=120) as client,
            grpc.aio.insecure_channel(target) as channel,
        ):
            stub = pb_grpc.InferenceServiceStub(channel)
            await direct(client, url, body)  # warm-up: model pages, connection
            await through_engine(engine, request)
            await through_router(stub, max_tokens)
            await through_router(stub, max_tokens, "routed")
            for _ in range(rounds):
                runs["direct"].append(await direct(client, url, body))
                runs["engine"].append(await through_engine(engine, request))
                runs["router"].append(await through_router(stub, max_tokens))
                runs["routed"].append(await through_router(stub, max_tokens, "routed"))
    finally:
        await engine.aclose()
    tokens = {r.tokens for rs in runs.values() for r in rs}
    print(f"# {rounds} rounds of {sorted(tokens)} streamed tokens each, median figures")
    base = statistics.median(r.tok_s for r in runs["direct"])
    mine = statistics.median(r.tok_s for r in runs["engine"])
    line("llama.cpp server, httpx client straight (baseline)", base, "tok/s")
    line("llama.cpp server, through OpenAIHttpEngine in process", mine, "tok/s", base)
    routed = statistics.median(r.tok_s for r in runs["router"])
    line(
        "llama.cpp server, through the router (gRPC Generate)",
        routed,
        "tok/s",
        base,
        "goal >= 0.95",
    )
    line(
        "llama.cpp server, through a routed deployment of 1 replica",
        statistics.median(r.tok_s for r in runs["routed"]),
        "tok/s",
        routed,
        "(baseline: the plain model above)",
    )
    # Each round's two runs are adjacent in time, so their ratio sees the same machine load.
    paired = statistics.median(
        e.tok_s / d.tok_s for d, e in zip(runs["direct"], runs["engine"], strict=True)
    )
    print(f"{'  median of per-round ratios (engine / straight)':<58} {paired:10.3f}", flush=True)
    base_ttft = statistics.median(r.ttft_s for r in runs["direct"]) * 1e3
    mine_ttft = statistics.median(r.ttft_s for r in runs["engine"]) * 1e3
    line("first token, httpx client straight (baseline)", base_ttft, "ms")
    line("first token, through OpenAIHttpEngine", mine_ttft, "ms", base_ttft)
    plain_ttft = statistics.median(r.ttft_s for r in runs["router"]) * 1e3
    routed_ttft = statistics.median(r.ttft_s for r in runs["routed"]) * 1e3
    line("first token, router, plain model (baseline)", plain_ttft, "ms")
    line("first token, router, routed deployment of 1 replica", routed_ttft, "ms", plain_ttft)
    # Client CPU per token: the engine's own cost, steadier than tok/s on a shared machine.
    base_cpu = statistics.median(r.cpu_s / r.tokens for r in runs["direct"]) * 1e6
    mine_cpu = statistics.median(r.cpu_s / r.tokens for r in runs["engine"]) * 1e6
    line("client CPU per token, httpx client straight (baseline)", base_cpu, "us")
    line("client CPU per token, through OpenAIHttpEngine", mine_cpu, "us", base_cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 tokens (CI smoke)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    # One llama.cpp thread leaves a core to the client; with two on a 2-core machine any other
    # load stalls llama.cpp's per-layer thread barrier and tok/s swings by 2x between runs.
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    args = parser.parse_args()
    rounds, max_tokens = (3, 64) if args.quick else (args.rounds, args.max_tokens)
    print(f"# remote engine benchmark, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    reason = llama_cpp_missing()
    if reason:
        print(f"remote engine: skipped ({reason})")
        return
    prepare_models(load_config().model_cache, progress=False)
    with (
        running_llama_server(smollm2_gguf_path(), threads=args.threads) as server,
        tempfile.TemporaryDirectory() as tmp,
        router_process(config=router_config(Path(tmp), server.url, server.model)) as target,
    ):
        asyncio.run(bench(server.url, server.model, rounds, max_tokens, target))


if __name__ == "__main__":
    main()

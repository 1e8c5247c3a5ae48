"""The load-test harness's own benchmarks, each a ratio measured in the same run:

1. its ceiling: unary ListModels calls/s that `irouter loadtest` generates with 1 and 2 client
   processes, next to h2load on the same call (clients on core 1, server on core 0), against the
   router and against a bare grpc.aio ListModels;
2. the REST proxy's cost: p50 latency of short non-streamed /v1/chat/completions answers
   (max_tokens 1-4, temperature 0) minus the same requests as gRPC Complete, in ms, once with
   every answer a response-cache hit (the proxy hop alone) and once generated; next to it
   the transport floor measured the same way against two canned servers (a bare Starlette app
   under the proxy's uvicorn settings, a bare grpc.aio Complete), which shows how much of the
   difference is the HTTP client and server stack rather than the proxy's own work;
3. streamed tokens/s through SSE (/v1/chat/completions, stream) / through gRPC Generate.
(3) and the second half of (2) run against a router with the response cache off.

    python -m loadtest.benchmarks.harness_bench [--quick] [--only ceiling|proxy|stream]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import uvloop

from loadtest.benchmarks.serve_bench import ROOT, _h2load, router_process
from loadtest.harness.results import run_scenario
from loadtest.harness.scenario import scenario_from_dict
from loadtest.processes import free_port
from router.config_file import load_config
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc

SHORT_QUESTIONS = (
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 7 times 8?",
    "Say hello in Spanish.",
    "Which planet is largest?",
    "What is H2O?",
    "Who wrote Hamlet?",
    "Is ice cold?",
)


def line(name: str, value: float, unit: str, baseline: float | None = None, goal: str = "") -> None:
    ratio = f"  ratio {value / baseline:6.2f}" if baseline else ""
    print(f"{name:<68} {value:10.2f} {unit:<6}{ratio}  {goal}", flush=True)


@contextmanager
def uncached_router() -> Iterator[str]:
    """A router with the response cache off: repeated greedy requests must really be generated
    (the cache would otherwise answer the second path's requests from the first path's)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "router.yaml"
        config.write_text("cache:\n  response:\n    enabled: false\n")
        with router_process(config=config) as target:
            yield target


def _harness_cli(target: str, args: list[str], cpus: str | None) -> dict[str, Any]:
    """Run `python -m loadtest.harness run` as its own process tree; its results mapping."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "loadtest.harness", "run", "--target", target, *args]
        cmd += ["--out", str(out), "--no-html", "--no-progress"]
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def bench_ceiling(quick: bool) -> None:
    """Server on core 0, client on core 1, 64 calls in flight: against the router (the router is
    the limit, so this shows whether the harness saturates it as h2load does) and against a bare
    grpc.aio ListModels (a cheaper server, so this shows the harness's own ceiling on one core)."""
    if shutil.which("h2load") is None or shutil.which("taskset") is None:
        print("harness ceiling: skipped (h2load from Debian's nghttp2-client, or taskset, missing)")
        return
    seconds = "4" if quick else "8"
    common = ["--method", "ListModels", "--concurrency", "64", "--duration", seconds]
    requests = 20_000 if quick else 50_000
    servers: list[tuple[str, Callable[[], AbstractContextManager[str]]]] = [
        ("router", lambda: router_process(cpus="0")),
        ("bare grpc.aio ListModels", lambda: canned_process("grpc", cpus="0")),
    ]
    for name, server in servers:
        with server() as target, tempfile.TemporaryDirectory() as tmp:
            _harness_cli(f"grpc://{target}", [*common, "--duration", "1"], "1")  # warm up
            url = f"http://{target}/irouter.v1.InferenceService/ListModels"
            body = Path(tmp) / "empty.bin"
            body.write_bytes(struct.pack(">BI", 0, 0))  # gRPC frame of an empty message
            h2 = _h2load(url, body, requests)
            one = _harness_cli(f"grpc://{target}", [*common, "--processes", "1"], "1")
            two = _harness_cli(f"grpc://{target}", [*common, "--processes", "2"], "1")
        line(f"h2load ListModels -> {name} (server core 0, client core 1)", h2, "req/s")
        for label, result in (("1 process", one), ("2 processes", two)):
            summary = result["stages"][0]["summary"]
            rate = summary["request_throughput"]
            line(f"  irouter loadtest, {label}, same call", rate, "req/s", h2)
            if summary["failed"]:
                print(f"  ({summary['failed']} calls failed: {summary['errors']})")


@contextmanager
def proxy_process(target: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "proxy", "--port", str(port), "--target", target],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy at {url} did not answer in 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- canned servers: the transport floor --------------------------------------------------------

_CANNED_TEXT = "Paris."


class _CannedInference(pb_grpc.InferenceServiceServicer):
    async def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        return pb.CompleteResponse(
            id="canned",
            text=_CANNED_TEXT,
            model=request.model,
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=10, completion_tokens=2, total_tokens=12),
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse()


async def _serve_canned_grpc(port: int) -> None:
    import grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # Only Complete is called; the generated base class answers UNIMPLEMENTED to the others.
    pb_grpc.add_InferenceServiceServicer_to_server(_CannedInference(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _serve_canned_http(port: int) -> None:
    """A chat.completion answer without a router, under the proxy's own uvicorn settings."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(
            {
                "id": "canned",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _CANNED_TEXT},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            }
        )

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": []})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info", ws="none")


@contextmanager
def canned_process(kind: str, cpus: str | None = None) -> Iterator[str]:
    """A canned server in its own process: 'grpc' yields host:port, 'http' a base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.benchmarks.harness_bench", "--canned", kind]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"127.0.0.1:{port}" if kind == "grpc" else f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = uvloop.run(run_scenario(scenario_from_dict(spec)))["stages"][0][
        "summary"
    ]
    if summary["failed"]:
        print(f"  ({summary['failed']} failed: {summary['errors']})")
    return summary


def _p50_rounds(paths: dict[str, dict[str, Any]], rounds: int, warm: int) -> dict[str, list[float]]:
    """p50 e2e (ms) of every path in every round; paths alternate inside a round."""
    for spec in paths.values():
        _run({**spec, "requests": warm})
    p50: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, spec in paths.items():
            p50[name].append(_run(spec)["e2e_ms"]["p50"])
    return p50


def _median_diff(p50: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(y - x for x, y in zip(p50[a], p50[b], strict=True))


def bench_proxy(quick: bool) -> None:
    """Same seed, same prompts, same max_tokens sequence on every path; rounds alternate so that
    drift hits all paths equally; each figure is the median over rounds of a p50 or of a
    difference of p50s measured in the same round. Twice: with the response cache on (every
    answer a cache hit after the warm-up, so the router costs ~1 ms and the difference is the
    proxy hop with little noise) and with it off (every answer generated, as users see it)."""
    rounds = 3
    requests = 50 if quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "short.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in SHORT_QUESTIONS))
        base = {
            "load": {"mode": "closed", "concurrency": 1},
            "requests": requests,
            "max_tokens": {"dist": "uniform", "min": 1, "max": 4},
            "temperature": 0,
            "prompts": str(prompts),
            "seed": 11,
        }
        with canned_process("grpc") as canned_grpc, canned_process("http") as canned_http:
            floor = _p50_rounds(
                {
                    "grpc": {**base, "target": f"grpc://{canned_grpc}", "mix": "Complete"},
                    "http": {**base, "target": canned_http, "mix": "chat"},
                },
                rounds,
                warm=20,
            )
        transport = _median_diff(floor, "grpc", "http")
        line("floor: canned gRPC Complete p50 (no router)", statistics.median(floor["grpc"]), "ms")
        line(
            "floor: canned Starlette chat p50 (httpx -> uvicorn, no router)",
            statistics.median(floor["http"]),
            "ms",
        )
        line("transport floor: canned HTTP p50 - canned gRPC p50", transport, "ms")
        servers: list[tuple[str, Callable[[], AbstractContextManager[str]]]] = [
            ("cache hits", router_process),
            ("cache off", uncached_router),
        ]
        for label, server in servers:
            with server() as target, proxy_process(target) as url:
                p50 = _p50_rounds(
                    {
                        "grpc": {**base, "target": f"grpc://{target}", "mix": "Complete"},
                        "rest": {**base, "target": url, "mix": "chat"},
                    },
                    rounds,
                    # With the cache on, the warm-up stores all 8 prompts x 4 lengths.
                    warm=100 if label == "cache hits" else 20,
                )
            added = _median_diff(p50, "grpc", "rest")
            line(
                f"[{label}] gRPC Complete p50, max_tokens 1-4", statistics.median(p50["grpc"]), "ms"
            )
            line(
                f"[{label}] REST /v1/chat/completions p50, same requests",
                statistics.median(p50["rest"]),
                "ms",
            )
            line(f"[{label}] proxy cost: REST p50 - gRPC p50", added, "ms", None, "goal <= 0.5")
            line(
                f"[{label}] proxy's own work: proxy cost - transport floor", added - transport, "ms"
            )


def bench_stream(quick: bool) -> None:
    seconds = 5.0 if quick else 10.0
    rounds = 1 if quick else 2
    with uncached_router() as target, proxy_process(target) as url:
        base = {
            "load": {"mode": "closed", "concurrency": 8},
            "duration_s": seconds,
            "max_tokens": 64,
            "ignore_eos": True,
            "temperature": 0,
            "seed": 5,
        }
        grpc_spec = {**base, "target": f"grpc://{target}", "mix": "Generate"}
        sse_spec = {**base, "target": url, "mix": "chat-stream"}
        _run({**grpc_spec, "duration_s": 1.0})
        _run({**sse_spec, "duration_s": 1.0})
        grpc_rates: list[float] = []
        sse_rates: list[float] = []
        for _ in range(rounds):
            grpc_rates.append(_run(grpc_spec)["output_token_throughput"])
            sse_rates.append(_run(sse_spec)["output_token_throughput"])
    g, s = statistics.median(grpc_rates), statistics.median(sse_rates)
    line("gRPC Generate, 8 streams x 64 tokens (output tok/s)", g, "tok/s")
    line("SSE /v1/chat/completions stream, same load", s, "tok/s", g, "goal >= 0.9")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter runs (CI smoke)")
    parser.add_argument("--only", choices=("ceiling", "proxy", "stream"))
    parser.add_argument("--canned", choices=("grpc", "http"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.canned == "grpc":
        uvloop.run(_serve_canned_grpc(args.port))
        return
    if args.canned == "http":
        _serve_canned_http(args.port)
        return
    cache = load_config().model_cache
    from router.models.prepare import prepare_models

    prepare_models(cache, progress=False)
    os.environ.setdefault("IROUTER_MODEL_CACHE", str(cache))
    print(
        f"# load-test harness benchmarks, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if args.only in (None, "ceiling"):
        bench_ceiling(args.quick)
    if args.only in (None, "proxy"):
        bench_proxy(args.quick)
    if args.only in (None, "stream"):
        bench_stream(args.quick)


if __name__ == "__main__":
    main()

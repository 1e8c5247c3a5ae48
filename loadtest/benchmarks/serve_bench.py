"""Serving benchmarks: the router as a separate process, driven over gRPC, each figure printed as
a ratio against a baseline measured in the same run (bare ONNX Runtime loops, a bare grpc.aio echo).

    python -m loadtest.benchmarks.serve_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np

from loadtest.benchmarks.ort_baseline import (
    CHAT,
    SENTENCE,
    bare_decode_tok_s,
    bare_embed_texts_s,
)
from loadtest.processes import free_port, wait_serving
from router.config_file import load_config
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
GEN = "smollm2-135m-instruct"
EMB = "all-minilm-l6-v2"


ROUTER_PIDS: dict[str, int] = {}
"""target -> pid of each router_process() running (to pin it to a core mid-run)."""


@contextmanager
def router_process(cpus: str | None = None, config: Path | None = None) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "router",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
    ]
    if config is not None:
        cmd += ["--config", str(config)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    ROUTER_PIDS[target] = proc.pid
    try:
        wait_serving(target)
        yield target
    finally:
        ROUTER_PIDS.pop(target, None)
        proc.terminate()
        proc.wait(timeout=30)


def line(name: str, value: float, unit: str, baseline: float | None = None, goal: str = "") -> None:
    ratio = f"  ratio {value / baseline:6.2f}" if baseline else ""
    print(f"{name:<58} {value:10.2f} {unit:<8}{ratio}  {goal}", flush=True)


# ---- generation ---------------------------------------------------------------------------------


async def _stream(
    stub: pb_grpc.InferenceServiceStub,
    prompt: str,
    n: int,
    metadata: tuple[tuple[str, str], ...] = (),
    model: str = GEN,
) -> tuple[float, int, float]:
    # The bare baseline's own conversation, so both sides prefill the same prompt.
    messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT]
    if prompt != CHAT[-1]["content"]:
        messages = [pb.ChatMessage(role="user", content=prompt)]
    request = pb.GenerateRequest(
        model=model,
        chat=pb.ChatMessages(messages=messages),
        sampling=pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
        cache_mode=pb.CACHE_MODE_BYPASS,  # these measure the engine, not the response cache
    )
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async for chunk in stub.Generate(request, metadata=metadata):
        if not ttft:
            ttft = time.perf_counter() - started
        if chunk.finish_reason:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens, time.perf_counter() - started


async def generate_load(
    target: str,
    streams: int,
    n: int,
    rounds: int,
    metadata: tuple[tuple[str, str], ...] = (),
    model: str = GEN,
) -> tuple[float, list[float]]:
    """Aggregate completion tok/s with `streams` submitted together; TTFTs of every stream."""
    rates: list[float] = []
    ttfts: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await _stream(stub, "warm up", 8, metadata, model)
        for _ in range(rounds):
            started = time.perf_counter()
            results = await asyncio.gather(
                *(_stream(stub, CHAT[-1]["content"], n, metadata, model) for i in range(streams))
            )
            elapsed = time.perf_counter() - started
            rates.append(sum(r[1] for r in results) / elapsed)
            ttfts.extend(r[0] for r in results)
    return float(np.median(rates)), ttfts


def bench_generate(model_dir: Path, quick: bool) -> None:
    n = 64 if quick else 128
    rounds = 1 if quick else 3
    bare = bare_decode_tok_s(model_dir, new_tokens=n)
    line("bare ONNX Runtime greedy loop, 1 stream", bare, "tok/s")
    with router_process() as target:
        one, ttft1 = asyncio.run(generate_load(target, 1, n, rounds))
        line("Generate through gRPC, 1 stream", one, "tok/s", bare, "goal >= 0.95")
        sixteen, ttft16 = asyncio.run(generate_load(target, 16, n, rounds))
        line(
            "Generate through gRPC, 16 streams (aggregate)",
            sixteen,
            "tok/s",
            one,
            "vs 1 stream; goal >= 4",
        )
    for label, values in (("1 stream", ttft1), ("16 streams", ttft16)):
        ms = np.array(values) * 1000
        line(f"time to first token p50, {label}", float(np.percentile(ms, 50)), "ms")
        line(f"time to first token p99, {label}", float(np.percentile(ms, 99)), "ms")


# ---- embedding ----------------------------------------------------------------------------------


async def embed_load(target: str, callers: int, seconds: float) -> float:
    texts = [f"{SENTENCE} ({i})" for i in range(64)]  # what the bare encoder loop embeds
    done = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Embed(pb.EmbedRequest(model=EMB, texts=texts[:1]))
        stop_at = time.perf_counter() + seconds

        async def caller(i: int) -> None:
            nonlocal done
            k = i
            while time.perf_counter() < stop_at:
                await stub.Embed(pb.EmbedRequest(model=EMB, texts=[texts[k % len(texts)]]))
                done += 1
                k += callers

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        return done / (time.perf_counter() - started)


def bench_embed(model_dir: Path, quick: bool) -> None:
    seconds = 3.0 if quick else 8.0
    bare = bare_embed_texts_s(model_dir, batch=32)
    line("bare ONNX Runtime encoder, batch 32", bare, "texts/s")
    # The texts repeat, so the embedding cache is off: this measures the encoder path.
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text("cache: {embedding: {enabled: false}}\n")
        with router_process(config=config) as target:
            rate = asyncio.run(embed_load(target, 64, seconds))
    line(
        "Embed through gRPC, 64 concurrent callers, 1 text each",
        rate,
        "texts/s",
        bare,
        "goal >= 0.9",
    )


# ---- unary overhead -----------------------------------------------------------------------------


def _h2load(url: str, body: Path, requests: int, headers: tuple[str, ...] = ()) -> float:
    extra = [arg for header in headers for arg in ("-H", header)]
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "h2load",
            "-n",
            str(requests),
            "-c",
            "1",
            "-m",
            "64",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            *extra,
            "-d",
            str(body),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for row in out.splitlines():
        if row.startswith("finished in"):
            return float(row.split(",")[1].split()[0])
    raise RuntimeError(f"h2load printed no rate:\n{out}")


@contextmanager
def echo_process() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "loadtest.benchmarks.echo_server", str(port)],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_unary(quick: bool) -> None:
    if shutil.which("h2load") is None or shutil.which("taskset") is None:
        print("unary overhead: skipped (h2load from Debian's nghttp2-client, or taskset, missing)")
        return
    requests = 20_000 if quick else 60_000
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.bin"
        empty.write_bytes(struct.pack(">BI", 0, 0))
        echo_body = Path(tmp) / "echo.bin"
        echo_body.write_bytes(struct.pack(">BI", 0, 16) + b"x" * 16)
        with echo_process() as target:
            echo = _h2load(f"http://{target}/bench.Echo/Echo", echo_body, requests)
        line("bare grpc.aio + uvloop echo (1 core, h2load 64 in flight)", echo, "req/s")
        with router_process(cpus="0") as target:
            rate = _h2load(
                f"http://{target}/irouter.v1.InferenceService/ListModels", empty, requests
            )
        line("ListModels through the router (1 core)", rate, "req/s", echo, "goal >= 0.9")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter runs (CI smoke)")
    parser.add_argument("--only", choices=("generate", "embed", "unary"))
    args = parser.parse_args()
    cache = load_config().model_cache
    from router.models.prepare import prepare_models

    prepare_models(cache, progress=False)
    os.environ.setdefault("IROUTER_MODEL_CACHE", str(cache))
    print(f"# serving benchmarks, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.only in (None, "generate"):
        bench_generate(cache / GEN, args.quick)
    if args.only in (None, "embed"):
        bench_embed(cache / EMB, args.quick)
    if args.only in (None, "unary"):
        bench_unary(args.quick)


if __name__ == "__main__":
    main()

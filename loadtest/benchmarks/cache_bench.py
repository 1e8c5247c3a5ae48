"""Cache and retrieval-augmented generation benchmarks, each a ratio against a baseline measured
in the same run:

- a cache-hit Complete at 1 in flight (p50 latency) against a bare grpc.aio echo, both servers
  pinned to core 0 and called from a grpc.aio client on the other core (goal: at most 2x);
- a Generate with the retrieval option (top_k 4 from 1,000 stdlib docstring sentences) against
  the same Generate without it: time to first token p50, both bypassing the response cache.

    python -m loadtest.benchmarks.cache_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import re
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from loadtest.benchmarks.serve_bench import EMB, GEN, echo_process, line, router_process
from router.config_file import load_config
from router.models.prepare import prepare_models
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as rpb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as rpb_grpc

CORPUS_MODULES = ("json", "pathlib", "collections", "itertools", "functools", "string", "textwrap")
QUESTION = "How do I read a JSON document from a file object?"


def corpus(n: int) -> list[str]:
    """Up to n sentences of 6 to 40 words from stdlib docstrings (deterministic)."""
    found: set[str] = set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, attr, None)) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(sentence.split()) <= 40:
                    found.add(sentence)
    return sorted(found)[:n]


def write_config(tmp: Path) -> Path:
    data_dir = tmp / "collections"
    data_dir.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(f"retrieval:\n  data_dir: {data_dir}\n  fsync: false\n")
    return path


def p50_ms(samples: list[float]) -> float:
    return float(np.percentile(np.array(samples) * 1000, 50))


async def echo_latencies(target: str, calls: int) -> list[float]:
    async with grpc.aio.insecure_channel(target) as channel:
        echo = channel.unary_unary("/bench.Echo/Echo")
        payload = b"x" * 16
        for _ in range(200):
            await echo(payload)
        out = []
        for _ in range(calls):
            started = time.perf_counter()
            await echo(payload)
            out.append(time.perf_counter() - started)
        return out


async def hit_latencies(target: str, calls: int) -> list[float]:
    request = pb.CompleteRequest(
        model=GEN,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Name a colour.")]),
        sampling=pb.SamplingParams(max_tokens=16, temperature=0.0),
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        first = await stub.Complete(request)
        assert first.cache_status == pb.CACHE_STATUS_MISS, first
        for _ in range(200):
            await stub.Complete(request)
        out = []
        for _ in range(calls):
            started = time.perf_counter()
            response = await stub.Complete(request)
            out.append(time.perf_counter() - started)
        assert response.cache_status == pb.CACHE_STATUS_EXACT_HIT, response
        return out


def bench_cache_hit(quick: bool) -> None:
    calls = 2000 if quick else 6000
    with echo_process() as target:
        echo = asyncio.run(echo_latencies(target, calls))
    line("bare grpc.aio echo p50, 1 in flight (server on 1 core)", p50_ms(echo), "ms")
    with router_process(cpus="0") as target:
        hits = asyncio.run(hit_latencies(target, calls))
    line(
        "cache-hit Complete p50, 1 in flight (router on 1 core)",
        p50_ms(hits),
        "ms",
        p50_ms(echo),
        "goal <= 2",
    )


async def ttfts(target: str, rounds: int, docs: list[str]) -> tuple[list[float], list[float], int]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        collections = rpb_grpc.RetrievalServiceStub(channel)
        await collections.CreateCollection(
            rpb.CreateCollectionRequest(
                config=rpb.CollectionConfig(name="docs", embedding_model=EMB)
            )
        )
        for start in range(0, len(docs), 64):
            await collections.Upsert(
                rpb.UpsertRequest(
                    collection="docs",
                    documents=[
                        rpb.Document(id=str(start + i), text=t)
                        for i, t in enumerate(docs[start : start + 64])
                    ],
                )
            )

        def request(rag: bool) -> pb.GenerateRequest:
            r = pb.GenerateRequest(
                model=GEN,
                chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)]),
                sampling=pb.SamplingParams(max_tokens=4, temperature=0.0),
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
            if rag:
                r.retrieval.collection = "docs"
                r.retrieval.top_k = 4
            return r

        async def ttft(rag: bool) -> tuple[float, int]:
            started = time.perf_counter()
            first = 0.0
            prompt = 0
            async for chunk in stub.Generate(request(rag)):
                first = first or time.perf_counter() - started
                prompt = chunk.usage.prompt_tokens or prompt
            return first, prompt

        plain: list[float] = []
        rag: list[float] = []
        extra = 0
        for _ in range(3):
            await ttft(True)
        for _ in range(rounds):
            t, p0 = await ttft(False)
            plain.append(t)
            t, p1 = await ttft(True)
            rag.append(t)
            extra = p1 - p0
        return plain, rag, extra


def bench_rag(quick: bool) -> None:
    rounds = 15 if quick else 40
    docs = corpus(1000)
    with tempfile.TemporaryDirectory() as tmp, router_process(config=write_config(Path(tmp))) as t:
        plain, rag, extra = asyncio.run(ttfts(t, rounds, docs))
    line("Generate TTFT p50, no retrieval", p50_ms(plain), "ms")
    line(
        f"Generate TTFT p50, retrieval top 4 of {len(docs)} (+{extra} prompt tokens)",
        p50_ms(rag),
        "ms",
        p50_ms(plain),
        "RAG vs plain",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    cache = load_config().model_cache
    prepare_models(cache, progress=False)
    os.environ.setdefault("IROUTER_MODEL_CACHE", str(cache))
    bench_cache_hit(args.quick)
    bench_rag(args.quick)


if __name__ == "__main__":
    main()

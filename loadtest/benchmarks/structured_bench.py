"""Structured outputs' cost: constrained decoding against free decoding of the same number of
tokens on the same router (1 and 16 streams), grammar compile time cold and cached, and the mask
cost per step next to a decode step's time, each a ratio against a baseline from the same run.

    python -m loadtest.benchmarks.structured_bench [--quick]

The constrained calls ask for a JSON object whose one string must be at least 2,000 characters
long, so the grammar cannot end before max_tokens: both sides decode exactly n tokens greedily.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import grpc
import numpy as np
from tokenizers import Tokenizer

from backends.base import SamplingParams, StructuredOutput
from loadtest.benchmarks.serve_bench import GEN, line, router_process
from router.config_file import load_config
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.scheduler.request import Request
from router.structured import masks
from router.structured.compiler import GrammarCompiler

LONG = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
}
PROMPT = "Write a long story about a lighthouse keeper, as JSON."


async def _stream(stub: pb_grpc.InferenceServiceStub, n: int, structured: bool) -> int:
    sampling = pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=not structured)
    if structured:
        sampling.structured_output.json_schema = json.dumps(LONG)
    request = pb.GenerateRequest(
        model=GEN,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPT)]),
        sampling=sampling,
        cache_mode=pb.CACHE_MODE_BYPASS,
    )
    tokens = 0
    async for chunk in stub.Generate(request):
        if chunk.finish_reason:
            tokens = chunk.usage.completion_tokens
    return tokens


async def decode_rate(target: str, streams: int, n: int, rounds: int, structured: bool) -> float:
    """Aggregate completion tok/s, median over rounds, `streams` submitted together."""
    rates = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await _stream(stub, 8, structured)  # warm up (and compile the grammar once)
        for _ in range(rounds):
            started = time.perf_counter()
            done = await asyncio.gather(*(_stream(stub, n, structured) for _ in range(streams)))
            assert all(t == n for t in done), done  # both sides decode exactly n tokens
            rates.append(sum(done) / (time.perf_counter() - started))
    return float(np.median(rates))


def bench_compile(tokenizer: Tokenizer) -> None:
    specs = [
        StructuredOutput("json_schema", json.dumps(PERSON)),
        StructuredOutput("json_object"),
        StructuredOutput("regex", r"[A-Z][a-z]{2,10} [0-9]{1,3}"),
        StructuredOutput("grammar", 'start: expr\nexpr: NUM (("+" | "*") NUM)*\nNUM: /[0-9]+/'),
    ]

    async def run() -> tuple[float, float, float]:
        started = time.perf_counter()
        await GrammarCompiler(GEN, tokenizer, 49152, [0, 2]).compile(specs[2])
        view = time.perf_counter() - started  # the model's tokenizer view, once per model
        cold, cached = [], []
        for _ in range(5):
            grammars = GrammarCompiler(GEN, tokenizer, 49152, [0, 2])
            grammars._view = grammars._tokenizer_view()  # built above: time the compiles alone
            for spec in specs:
                t = time.perf_counter()
                await grammars.compile(spec)
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                await grammars.compile(spec)
                cached.append(time.perf_counter() - t)
        return view, statistics.median(cold), statistics.median(cached)

    view, cold, cached = asyncio.run(run())
    line("tokenizer view for grammars, once per model", view * 1e3, "ms")
    line("grammar compile, cold (median of 4 specs x 5)", cold * 1e3, "ms")
    line("grammar compile, cached", cached * 1e6, "us", cold * 1e6, "vs cold")


DOCUMENT = (
    '{"name": "Ann Lee", "age": 31, "tags": ["pilot", "chess", "tea"], '
    '"address": {"city": "Oslo", "zip": "01234"}}'
)


def mask_cost(tokenizer: Tokenizer, rows: int) -> float:
    """Seconds per step to fill `rows` masks and advance their matchers, each row writing
    DOCUMENT (a PERSON) token by token as a model would."""
    grammars = GrammarCompiler(GEN, tokenizer, 49152, [0, 2])
    grammar = asyncio.run(grammars.compile(StructuredOutput("json_schema", json.dumps(PERSON))))
    ids = tokenizer.encode(DOCUMENT, add_special_tokens=False).ids
    spent = 0.0
    steps = 0
    for _ in range(5):
        reqs = []
        for i in range(rows):
            req = Request(f"r{i}", i, [1], SamplingParams(max_tokens=len(ids)), seed=i)
            req.grammar = grammar
            reqs.append(req)
        for token in ids:
            t = time.perf_counter()
            masks.fill(reqs, 49152)
            assert not masks.advance(reqs, [token] * rows)
            spent += time.perf_counter() - t
            steps += 1
    return spent / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, rounds = (64, 1) if args.quick else (128, 3)
    tokenizer = Tokenizer.from_file(str(load_config().model_cache / GEN / "tokenizer.json"))
    bench_compile(tokenizer)
    with router_process() as target:
        rates = {}
        for streams in (1, 16):
            free = asyncio.run(decode_rate(target, streams, n, rounds, structured=False))
            constrained = asyncio.run(decode_rate(target, streams, n, rounds, structured=True))
            rates[streams] = free
            line(f"free greedy decode, {streams} stream(s)", free, "tok/s")
            line(
                f"json_schema-constrained decode, {streams} stream(s)",
                constrained,
                "tok/s",
                free,
                "goal >= 0.9",
            )
    for rows in (1, 16):
        step = rows / rates[rows]  # one decode step's time at this batch size
        cost = mask_cost(tokenizer, rows)
        line(f"free decode step, {rows} row(s) (streams / tok/s)", step * 1e6, "us")
        line(
            f"masks + advance per step, {rows} row(s)",
            cost * 1e6,
            "us",
            step * 1e6,
            f"{100 * cost / step:.1f}% of a step",
        )


if __name__ == "__main__":
    main()

"""Prefix caching against a real `irouter serve` (issue 12, item 4): the same model served twice
in one router, with the prefix cache on (the default) and off, measured in the same run.

- 16 requests sharing a ~300-token system prompt, each with its own question, submitted
  together (after one request has put the system prompt in the cache, as earlier traffic
  would; then a system prompt nothing has cached): time to first token min / median / max,
  cache on and off;
- a growing conversation (5 turns, 48-token replies), each question sent at once and 0.5 s
  after the reply: each turn's time to first token, and turn 5 ÷ turn 1 with the cache on and
  off (goal: ≤ 0.5 with it on). These use the chat template's default system prompt, which
  earlier traffic has cached, so turn 1 computes little more than its question; a third
  conversation starts with a ~300-token system prompt of its own (a per-user or per-task
  prompt, nothing cached before), so turn 1 computes its whole prompt as the goal assumes;
- one stream's decode speed with the cache on ÷ off (what looking up and saving costs a request
  that shares nothing).

`--decode-kernel avx2` computes both models' steps with the native kernels' AVX2 code, as an
AVX2-only host does (on an AVX-512 machine).

    python -m loadtest.benchmarks.prefix_bench [--quick] [--decode-kernel avx2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from backends.cpu import cpu_info
from loadtest.benchmarks.batching_bench import PINNABLE, rss_mib
from loadtest.benchmarks.serve_bench import GEN, ROUTER_PIDS, line, router_process
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc

CACHED, UNCACHED = "cached", "uncached"
PAUSE_S = 0.5
"""A person's pause between a reply and the next question (far shorter than reading takes)."""
SYSTEM = " ".join(
    f"Rule {i}: answer politely, cite the timetable of line {i}, and never invent a platform."
    for i in range(1, 16)
)
QUESTIONS = [
    f"Which platform does the {h}:{m:02d} train to {city} leave from?"
    for h, m, city in [
        (6, 5, "Lyon"),
        (7, 12, "Nice"),
        (8, 20, "Lille"),
        (9, 33, "Brest"),
        (10, 41, "Dijon"),
        (11, 50, "Metz"),
        (12, 2, "Pau"),
        (13, 15, "Tours"),
        (14, 27, "Reims"),
        (15, 38, "Nancy"),
        (16, 44, "Caen"),
        (17, 53, "Rouen"),
        (18, 6, "Nantes"),
        (19, 19, "Annecy"),
        (20, 31, "Toulon"),
        (21, 47, "Amiens"),
    ]
]
CONFIG = f"""
models:
  - name: {CACHED}
    kind: generate
    artifact: {GEN}
    max_queue_wait_s: 0
    decode_kernel: {{kernel}}
  - name: {UNCACHED}
    kind: generate
    artifact: {GEN}
    max_queue_wait_s: 0
    decode_kernel: {{kernel}}
    prefix_cache_mb: 0
"""
"""`kernel`: the models' decode_kernel. max_queue_wait_s off: on a slow CPU, 16 uncached
300-token prompts take longer to prefill than its 10 s bound, and this measures the cache, not
admission."""


def _request(model: str, messages: list[tuple[str, str]], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        cache_mode=pb.CACHE_MODE_BYPASS,
        return_token_ids=True,
    )


async def _ttft_and_text(
    stub: pb_grpc.InferenceServiceStub, request: pb.GenerateRequest
) -> tuple[float, str, float]:
    """Seconds to the first token, the text, and decode tokens/s after the first token."""
    started = time.perf_counter()
    first = 0.0
    text, tokens = [], 0
    async for chunk in stub.Generate(request, timeout=600):
        if not first and chunk.token_ids:
            first = time.perf_counter() - started
        text.append(chunk.text)
        tokens += len(chunk.token_ids)
    rest = time.perf_counter() - started - first
    return first, "".join(text), (tokens - 1) / rest if rest > 0 else 0.0


async def shared_system_prompt(
    stub: pb_grpc.InferenceServiceStub, model: str, system: str, warm: bool
) -> list[float]:
    """Each request's TTFT; `warm`: one request has put the system prompt in the cache first."""
    if warm:
        await _ttft_and_text(stub, _request(model, [("system", system), ("user", "Hello.")], 4))
    results = await asyncio.gather(
        *(
            _ttft_and_text(stub, _request(model, [("system", system), ("user", q)], 16))
            for q in QUESTIONS
        )
    )
    return [r[0] for r in results]


async def conversation(
    stub: pb_grpc.InferenceServiceStub,
    model: str,
    pause_s: float,
    questions: list[str],
    system: str | None = None,
) -> list[float]:
    """Each turn's TTFT; the next question is sent `pause_s` after the reply ended."""
    history: list[tuple[str, str]] = [("system", system)] if system else []
    ttfts = []
    for question in questions:
        if history:
            await asyncio.sleep(pause_s)
        history.append(("user", question))
        ttft, text, _ = await _ttft_and_text(stub, _request(model, history, 48))
        ttfts.append(ttft)
        history.append(("assistant", text))
    return ttfts


async def run(target: str, quick: bool) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for model in (CACHED, UNCACHED):  # warm both engines up
            await _ttft_and_text(stub, _request(model, [("user", "Hi")], 4))

        # Cached by one request first, as earlier traffic would; then a system prompt nothing
        # has cached (each request's own differs from its first token on), which the first
        # request computes and the others wait for (router.scheduler.shared_prefix).
        for warm, system, what in (
            (True, SYSTEM, "cached by one request first"),
            (False, f"You are the desk assistant of station 12. {SYSTEM}", "nothing cached"),
        ):
            print(f"16 requests sharing a ~300-token system prompt ({what}), submitted together:")
            maxima = {}
            for model in (CACHED, UNCACHED):
                ttfts = sorted(await shared_system_prompt(stub, model, system, warm))
                maxima[model] = ttfts[-1]
                print(
                    f"  prefix cache {'on ' if model == CACHED else 'off'}: TTFT min / median / "
                    f"max {ttfts[0] * 1000:.0f} / {statistics.median(ttfts) * 1000:.0f} / "
                    f"{ttfts[-1] * 1000:.0f} ms",
                    flush=True,
                )
            line(
                f"TTFT max, cache on, {what}",
                maxima[CACHED] * 1000,
                "ms",
                maxima[UNCACHED] * 1000,
                "vs off",
            )

        # At once: a client replaying a conversation; after 0.5 s: a person reading the reply,
        # time in which the engine computes the reply into the cache (prefix_cache.py).
        ratio = {}
        # Each its own questions: a conversation run before would have cached the other's.
        # The third: a system prompt nothing has cached (the earlier requests' SYSTEM differs
        # from its first token on), computed whole by turn 1 only.
        own = f"You are the travel assistant of passenger 4711. {SYSTEM}"
        for pause_s, questions, system in (
            (0.0, QUESTIONS[:5], None),
            (PAUSE_S, QUESTIONS[5:10], None),
            (PAUSE_S, QUESTIONS[10:15], own),
        ):
            what = f"{pause_s:g} s between turns" if pause_s else "turns at once"
            if system:
                what += ", own system prompt"
            print(
                "A growing conversation (5 turns, 48-token replies, the next question "
                + (f"{pause_s:g} s after a reply" if pause_s else "at once")
                + (", a ~300-token system prompt of its own" if system else "")
                + "), time to first token per turn:"
            )
            for model in (CACHED, UNCACHED):
                ttfts = await conversation(stub, model, pause_s, questions, system)
                ratio[model, what] = ttfts[-1] / ttfts[0]
                print(
                    f"  prefix cache {'on ' if model == CACHED else 'off'}: "
                    + " / ".join(f"{t * 1000:.0f}" for t in ttfts)
                    + f" ms; turn 5 ÷ turn 1 {ratio[model, what]:.2f}",
                    flush=True,
                )
            line(
                f"turn 5 TTFT ÷ turn 1, cache on, {what}",
                ratio[CACHED, what],
                "x",
                None,
                "goal <= 0.5",
            )

        speeds = {}
        rounds = 2 if quick else 4
        for model in (CACHED, UNCACHED):
            samples = []
            for i in range(rounds):  # a prompt sharing nothing with anything cached
                request = _request(model, [("user", f"Count from {i * 7} to {i * 7 + 40}.")], 64)
                samples.append((await _ttft_and_text(stub, request))[2])
            speeds[model] = statistics.median(samples)
        line("1 stream decode tok/s, cache on", speeds[CACHED], "tok/s", speeds[UNCACHED], "vs off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--decode-kernel",
        default="auto",
        choices=PINNABLE,
        help="the native step's code for both models",
    )
    args = parser.parse_args()
    print(
        f"# prefix-cache benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{cpu_info()[0] or 'CPU unknown'}, decode_kernel: {args.decode_kernel}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(CONFIG.format(kernel=args.decode_kernel))
        with router_process(config=config) as target:
            loaded = rss_mib(ROUTER_PIDS[target])
            asyncio.run(run(target, args.quick))
            # The prefix caches are allocated at start: filling them must not grow memory.
            peak = rss_mib(ROUTER_PIDS[target], "VmHWM")
            line("router peak RSS after the runs", peak, "MiB", loaded, "vs once loaded")


if __name__ == "__main__":
    main()

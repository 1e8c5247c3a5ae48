"""Routing decision cost: microseconds per call to choose a replica among 64, for each balancer,
as a ratio against `random.choice` over the same list, measured in the same run. Then the whole
dispatcher per unary call (pick, outstanding count, breaker verdict, task, per-attempt timeout)
against awaiting the same no-op attempt directly.

    python -m loadtest.benchmarks.routing_bench [--quick]

Every replica carries a real circuit breaker; "16 open" rows have a quarter of them open, so the
balancer has to step around them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from router.routing.balancer import Affinity, PowerOfTwo, Replica, RoundRobin, WeightedSplit
from router.routing.breaker import CircuitBreaker
from router.routing.config import (
    BreakerConfig,
    DeploymentConfig,
    ReplicaConfig,
    RetryConfig,
    RoutingConfig,
)
from router.routing.dispatch import AttemptInfo, Dispatcher

REPLICAS = 64
OPEN = 16


def loop_seconds(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(
    fn: Callable[[], object], baseline: Callable[[], object], calls: int, repeat: int
) -> tuple[float, float]:
    """Median microseconds per call of fn and of the baseline, timed in alternation so that a
    neighbour's load on these shared cores weighs on both alike."""
    loop_seconds(fn, calls // 10)  # warm up
    loop_seconds(baseline, calls // 10)
    ours, theirs = [], []
    for _ in range(repeat):
        theirs.append(loop_seconds(baseline, calls))
        ours.append(loop_seconds(fn, calls))
    return statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6


def line(name: str, us: float, baseline_us: float, baseline: str) -> None:
    ratio = us / baseline_us
    print(f"{name:<46} {us:6.2f} us  {baseline} {baseline_us:5.2f} us  {ratio:5.1f}x", flush=True)


def make_replicas(rng: random.Random, *, weighted: bool = False) -> list[Replica]:
    config = BreakerConfig(consecutive_failures=1, cooldown_s=3600.0)
    replicas = []
    for i in range(REPLICAS):
        weight = float(1 + i % 4) if weighted else 1.0
        breaker = CircuitBreaker(config, name=f"bench/r{i}")
        replica = Replica(ReplicaConfig(f"r{i}", weight=weight), "bench", breaker)
        replica.outstanding = rng.randrange(8)
        replicas.append(replica)
    return replicas


def open_some(replicas: list[Replica], rng: random.Random) -> None:
    for replica in rng.sample(replicas, OPEN):
        replica.breaker.on_failure(replica.breaker.on_start())


def bench_balancers(calls: int, repeat: int) -> None:
    rng = random.Random(0)
    replicas = make_replicas(rng)
    weighted = make_replicas(rng, weighted=True)
    keys = [f"conversation-{i}" for i in range(4096)]
    key_iter = iter(range(1 << 62))

    def next_key() -> str:
        return keys[next(key_iter) & 4095]

    def run(name: str, fn: Callable[[], object], pool: list[Replica]) -> None:
        us, base = compare(fn, functools.partial(rng.choice, pool), calls, repeat)
        line(name, us, base, "random.choice")

    p2c = PowerOfTwo(replicas, random.Random(1))
    rr = RoundRobin(replicas)
    affinity = Affinity(replicas, random.Random(1))
    split = WeightedSplit({"stable": 95.0, "canary": 5.0})
    run("p2c least outstanding", p2c.pick, replicas)
    run("p2c, weighted replicas", PowerOfTwo(weighted, random.Random(1)).pick, weighted)
    run("round robin", rr.pick, replicas)
    run("round robin, weighted (smooth)", RoundRobin(weighted).pick, weighted)
    run("affinity (consistent hash of the key)", lambda: affinity.pick(next_key()), replicas)
    run("alias split 95/5 (per call, not per replica)", lambda: split.pick(rng), replicas)
    open_some(replicas, random.Random(2))
    run(f"p2c, {OPEN} of 64 breakers open", p2c.pick, replicas)
    run(f"round robin, {OPEN} of 64 breakers open", rr.pick, replicas)
    run(f"affinity, {OPEN} of 64 breakers open", lambda: affinity.pick(next_key()), replicas)


def bench_dispatcher(calls: int, repeat: int) -> None:
    replicas = tuple(ReplicaConfig(f"r{i}") for i in range(REPLICAS))

    def dispatcher(attempt_timeout_s: float) -> Dispatcher:
        retry = RetryConfig(attempt_timeout_s=attempt_timeout_s)
        config = RoutingConfig(deployments=(DeploymentConfig("bench", replicas, retry=retry),))
        return Dispatcher(config.validate(), rng=random.Random(3))

    untimed, timed = dispatcher(0.0), dispatcher(5.0)
    info = AttemptInfo("bench", "bench", replicas[0], 1, None)

    async def attempt(info: AttemptInfo) -> int:
        return 1

    async def one_item(info: AttemptInfo) -> AsyncIterator[int]:
        yield 1

    async def drain(items: AsyncIterator[int]) -> None:
        async for _ in items:
            pass

    async def loop(run: Callable[[], Awaitable[object]]) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await run()
        return (time.perf_counter() - start) / calls

    async def compare_async(run: Callable[[], Awaitable[object]]) -> tuple[float, float]:
        await loop(run)  # warm up
        ours, theirs = [], []
        for _ in range(repeat):
            theirs.append(await loop(lambda: attempt(info)))
            ours.append(await loop(run))
        return statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6

    async def main() -> None:
        us, base = await compare_async(lambda: untimed.unary("bench", attempt))
        line("Dispatcher.unary, p2c", us, base, "await attempt()")
        us, base = await compare_async(lambda: timed.unary("bench", attempt))
        line("Dispatcher.unary, p2c, 5 s attempt timeout", us, base, "await attempt()")
        us, base = await compare_async(lambda: drain(timed.stream("bench", one_item)))
        line("Dispatcher.stream of one item, 5 s timeout", us, base, "await attempt()")

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per figure")
    args = parser.parse_args()
    logging.getLogger("router.routing").setLevel(logging.ERROR)  # breakers opened on purpose
    calls, repeat = (20_000, 3) if args.quick else (100_000, 7)
    print(f"replica choice among {REPLICAS} replicas, median of {repeat} x {calls} calls")
    bench_balancers(calls, repeat)
    print()
    bench_dispatcher(calls // 10, repeat)


if __name__ == "__main__":
    main()

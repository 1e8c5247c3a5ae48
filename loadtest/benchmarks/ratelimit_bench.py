"""Cost of one rate-limited call: reserve + settle, in-process and on Redis.

    python -m loadtest.benchmarks.ratelimit_bench [--calls N]

Each call charges the tenant's request and token buckets (and its API key's when key_share < 1)
and refunds part of its tokens, as a generate call does. The Redis figures use a redis-server
started on a free port for the run (tests/redis_server.py); sequential is the latency one call
adds, concurrent the throughput of one replica's event loop with 64 calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from router.guard.limits import RateLimitConfig, RateLimiter, TierLimits
from tests.redis_server import redis_server_path, running_redis

# Limits no benchmark run reaches: every call is admitted, so this measures admission itself.
TIERS = {"default": TierLimits(10**9, 10**12, 10**6)}
TENANTS = [f"tenant{i}" for i in range(100)]


async def sequential_us(limiter: RateLimiter, calls: int, *, stream: bool = False) -> float:
    """Median over 5 rounds of µs per reserve + settle."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            tenant = TENANTS[i % len(TENANTS)]
            reservation = await limiter.reserve(
                tenant=tenant, key_id="key1", tier="default", tokens=300, stream=stream
            )
            await limiter.settle(reservation, used_tokens=120)
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


async def concurrent_per_s(limiter: RateLimiter, calls: int, in_flight: int = 64) -> float:
    async def worker(n: int) -> None:
        for i in range(n):
            reservation = await limiter.reserve(
                tenant=TENANTS[i % len(TENANTS)], key_id="k", tier="default", tokens=300,
                stream=False,
            )  # fmt: skip
            await limiter.settle(reservation, used_tokens=120)

    start = time.perf_counter()
    await asyncio.gather(*(worker(calls // in_flight) for _ in range(in_flight)))
    return (calls // in_flight) * in_flight / (time.perf_counter() - start)


async def main(calls: int) -> None:
    memory = RateLimiter(RateLimitConfig(tiers=TIERS))
    await sequential_us(memory, 1000)  # warm up
    unary = await sequential_us(memory, calls)
    stream = await sequential_us(memory, calls, stream=True)
    print(f"memory  reserve+settle          {unary:7.2f} µs/call  (stream: {stream:.2f} µs)")
    await memory.close()
    # key_share < 1 gives each API key buckets of its own: 4 buckets per call instead of 2.
    per_key = RateLimiter(RateLimitConfig(tiers=TIERS, key_share=0.5))
    await sequential_us(per_key, 1000)
    keyed = await sequential_us(per_key, calls)
    print(f"memory  reserve+settle, per key {keyed:7.2f} µs/call  (key_share=0.5: 4 buckets)")
    await per_key.close()

    if redis_server_path() is None:
        print("redis   skipped: no redis-server binary")
        return
    with tempfile.TemporaryDirectory() as tmp, running_redis(Path(tmp)) as server:
        config = RateLimitConfig(
            tiers=TIERS, store="redis", redis_url=server.url, redis_timeout_s=1.0
        )
        redis = RateLimiter(config)
        redis_calls = max(calls // 50, 500)
        await sequential_us(redis, 200)  # warm up: connection, script cache
        latency = await sequential_us(redis, redis_calls)
        client = redis.redis.client  # type: ignore[union-attr]
        start = time.perf_counter()
        for _ in range(redis_calls):
            await client.ping()
        ping = (time.perf_counter() - start) / redis_calls * 1e6
        throughput = await concurrent_per_s(redis, redis_calls * 4)
        print(
            f"redis   reserve+settle          {latency:7.2f} µs/call  "
            f"({latency / unary:.0f}x memory; 2 round trips)"
        )
        print(f"redis   PING with redis-py      {ping:7.2f} µs (the floor of one round trip)")
        print(f"redis   64 in flight            {throughput:7.0f} calls/s")
        assert redis.redis_errors == redis.fallbacks == 0, "Redis failed during the benchmark"
        await redis.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    uvloop.run(main(parser.parse_args().calls))

"""RateLimiter on Redis: the in-process semantics, shared across replicas (several limiters and
several OS processes on one real redis-server), and what happens when Redis dies, stalls or
forgets its scripts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from router.errors import ResourceExhausted, Unavailable
from router.guard.limits import RateLimitConfig, RateLimiter, Reservation, TierLimits
from tests.redis_server import RedisServer, redis_server_path, running_redis

pytestmark = pytest.mark.skipif(redis_server_path() is None, reason="needs a redis-server binary")

SMALL = {"default": TierLimits(10, 1000, 2)}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, for tests that kill or freeze it."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@contextlib.asynccontextmanager
async def redis_limiter(server: RedisServer, **config: Any) -> AsyncIterator[RateLimiter]:
    # A generous timeout: a busy test machine must not turn a slow answer into a fallback.
    config = {"redis_timeout_s": 2.0, **config}
    limiter = RateLimiter(RateLimitConfig(store="redis", redis_url=server.url, **config))
    try:
        yield limiter
    finally:
        await limiter.close()


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


async def reserve(limiter: RateLimiter, tenant: str, **call: Any) -> Reservation:
    call = {"key_id": None, "tier": "default", "tokens": 0, "stream": False, **call}
    return await limiter.reserve(tenant=tenant, **call)


async def admitted_until_rejected(
    limiter: RateLimiter, tenant: str, **call: Any
) -> tuple[int, ResourceExhausted]:
    for count in range(10_000):
        try:
            await reserve(limiter, tenant, **call)
        except ResourceExhausted as exc:
            return count, exc
    raise AssertionError("never rejected")


async def test_default_tier_admits_100_requests(redis_server: RedisServer) -> None:
    async with redis_limiter(redis_server) as limiter:
        tenant = new_tenant()
        count, error = await admitted_until_rejected(limiter, tenant)
        assert count == 100
        assert 0 < error.retry_after_s <= 0.6
        assert str(error).startswith(
            f"tenant {tenant!r} exceeded 100 requests per minute (tier 'default'); retry in "
        )
        assert error.violations == (
            (f"tenant:{tenant}", "100 requests per minute (tier 'default')"),
        )
        assert limiter.redis_errors == limiter.fallbacks == 0


async def test_tiers_differ(redis_server: RedisServer) -> None:
    # Slow refills (one request per 6 s and 1.2 s): the calls cannot outlast them.
    tiers = {"default": TierLimits(10, 1000, 2), "premium": TierLimits(50, 1000, 2)}
    async with redis_limiter(redis_server, tiers=tiers) as limiter:
        assert (await admitted_until_rejected(limiter, new_tenant()))[0] == 10
        assert (await admitted_until_rejected(limiter, new_tenant(), tier="premium"))[0] == 50


async def test_tokens_refunded_by_one_replica_are_seen_by_another(
    redis_server: RedisServer,
) -> None:
    tenant = new_tenant()
    async with (
        redis_limiter(redis_server, tiers=SMALL) as a,
        redis_limiter(redis_server, tiers=SMALL) as b,
    ):
        big = await reserve(a, tenant, tokens=1000)
        with pytest.raises(ResourceExhausted) as error:
            await reserve(b, tenant, tokens=1)
        assert 0 < error.value.retry_after_s <= 0.06  # one token at 1000 per minute
        await a.settle(big, used_tokens=200)
        await a.settle(big, used_tokens=200)  # idempotent: refunded once
        await reserve(b, tenant, tokens=800)
        with pytest.raises(ResourceExhausted):
            await reserve(b, tenant, tokens=1)


async def test_rejected_call_charges_no_bucket(redis_server: RedisServer) -> None:
    tenant = new_tenant()
    async with redis_limiter(redis_server, tiers={"default": TierLimits(2, 1000, 2)}) as limiter:
        await reserve(limiter, tenant, tokens=900)
        with pytest.raises(ResourceExhausted):
            await reserve(limiter, tenant, tokens=500)
        await reserve(limiter, tenant)
        with pytest.raises(ResourceExhausted) as error:
            await reserve(limiter, tenant)
        assert error.value.violations == (
            (f"tenant:{tenant}", "2 requests per minute (tier 'default')"),
        )


async def test_keys_and_tenant_both_limited(redis_server: RedisServer) -> None:
    tenant = new_tenant()
    async with redis_limiter(redis_server, tiers=SMALL, key_share=0.5) as limiter:
        count, error = await admitted_until_rejected(limiter, tenant, key_id="k1")
        assert count == 5
        assert error.violations == (
            ("api_key:k1", "5 requests per minute per key (tier 'default')"),
        )
        assert (await admitted_until_rejected(limiter, tenant, key_id="k2"))[0] == 5
        with pytest.raises(ResourceExhausted):
            await reserve(limiter, tenant)


async def test_stream_slots_are_shared_and_released(redis_server: RedisServer) -> None:
    tenant = new_tenant()
    async with (
        redis_limiter(redis_server, tiers=SMALL) as a,
        redis_limiter(redis_server, tiers=SMALL) as b,
    ):
        first = await reserve(a, tenant, stream=True)
        await reserve(b, tenant, stream=True)
        with pytest.raises(ResourceExhausted) as error:
            await reserve(a, tenant, stream=True)
        assert error.value.violations == (
            (f"tenant:{tenant}", "2 concurrent streams (tier 'default')"),
        )
        await a.settle(first, used_tokens=0)
        await a.settle(first, used_tokens=0)  # a second release frees nothing more
        await reserve(b, tenant, stream=True)
        with pytest.raises(ResourceExhausted):
            await reserve(b, tenant, stream=True)


async def test_slots_of_a_crashed_replica_expire(redis_server: RedisServer, client: Redis) -> None:
    tenant = new_tenant()
    key = f"irouter:rl:{{{tenant}}}:streams"
    async with redis_limiter(redis_server, tiers=SMALL) as limiter:
        await reserve(limiter, tenant, stream=True)
        await reserve(limiter, tenant, stream=True)
        assert 0 < await client.pttl(key) <= 3_600_000
        # Never settled (the replica died): age both slots past their deadline.
        members = cast(list[bytes], await client.zrange(key, 0, -1))
        await client.zadd(key, dict.fromkeys(members, 0), xx=True)
        await reserve(limiter, tenant, stream=True)
        assert await client.zcard(key) == 1


async def test_bucket_keys_expire_when_full(redis_server: RedisServer, client: Redis) -> None:
    tenant = new_tenant()
    async with redis_limiter(redis_server, tiers=SMALL, key_share=0.5) as limiter:
        reservation = await reserve(limiter, tenant, key_id="k", tokens=100)
        found = cast(list[bytes], await client.keys(f"irouter:rl:{{{tenant}}}:*"))
        keys = sorted(k.decode() for k in found)
        assert keys == [
            f"irouter:rl:{{{tenant}}}:{suffix}"
            for suffix in ("key:k:req", "key:k:tok", "req", "tok")
        ]
        for key in keys:
            assert 0 < await client.pttl(key) <= 60_001
        await limiter.settle(reservation, used_tokens=0)
        # Refunded in full: the token buckets are full again and need no key.
        assert await client.exists(*keys) == 2


async def test_noscript_recovers(redis_server: RedisServer, client: Redis) -> None:
    tenant = new_tenant()
    async with redis_limiter(redis_server, tiers={"default": TierLimits(3, 1000, 2)}) as limiter:
        await reserve(limiter, tenant)
        await client.script_flush()
        reservation = await reserve(limiter, tenant, tokens=1000)
        await client.script_flush()
        await limiter.settle(reservation, used_tokens=0)
        await reserve(limiter, tenant, tokens=1000)  # the refund went through
        with pytest.raises(ResourceExhausted):
            await reserve(limiter, tenant)
        assert limiter.redis_errors == 0


async def test_killed_redis_fails_open_then_recovers(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    tiers = {"default": TierLimits(3, 1000, 2)}
    async with redis_limiter(own_redis, tiers=tiers, redis_cooldown_s=60.0) as limiter:
        before = await reserve(limiter, "acme", tokens=10)
        own_redis.kill()
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                await reserve(limiter, "acme")  # this replica's own buckets: 3 per minute
            with pytest.raises(ResourceExhausted):
                await reserve(limiter, "acme")
            await limiter.settle(before, used_tokens=0)  # lost, but must not raise
        # One Redis failure; later calls skip Redis during the cooldown.
        assert limiter.redis_errors == 1
        assert limiter.fallbacks == 4
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"redis at 127.0.0.1:{own_redis.port} failed (charge)" in warnings[0]

    own_redis.restart()
    async with redis_limiter(own_redis, tiers=tiers, redis_cooldown_s=0.0) as limiter:
        own_redis.kill()
        with caplog.at_level(logging.WARNING):
            await reserve(limiter, "acme")
        own_redis.restart()
        await reserve(limiter, "acme")  # no cooldown: straight back to Redis
        assert (limiter.redis_errors, limiter.fallbacks) == (1, 1)
        client = Redis.from_url(own_redis.url)
        try:
            assert await client.exists("irouter:rl:{acme}:req") == 1
        finally:
            await client.aclose()


async def test_killed_redis_fails_closed(own_redis: RedisServer) -> None:
    async with redis_limiter(own_redis, on_redis_error="closed") as limiter:
        await reserve(limiter, "acme")
        own_redis.kill()
        with pytest.raises(Unavailable) as error:
            await reserve(limiter, "acme")
        assert str(error.value).startswith(
            f"rate limiter unavailable: redis at 127.0.0.1:{own_redis.port} failed (charge): "
        )
        with pytest.raises(Unavailable):
            await reserve(limiter, "acme")  # during the cooldown too
        assert (limiter.redis_errors, limiter.fallbacks) == (1, 0)


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_stalled_redis_times_out(own_redis: RedisServer, mode: str) -> None:
    async with redis_limiter(own_redis, redis_timeout_s=0.1, on_redis_error=mode) as limiter:
        await reserve(limiter, "acme")  # connected
        own_redis.pause()
        try:
            if mode == "open":
                await reserve(limiter, "acme")
                assert limiter.fallbacks == 1
            else:
                with pytest.raises(Unavailable, match=r"no answer within 0\.1 s"):
                    await reserve(limiter, "acme")
            assert limiter.redis_errors == 1
        finally:
            own_redis.resume()


# Several OS processes, each with its own limiter and connections, race for one tenant's buckets.
PROCESSES = 3
CALLS_PER_PROCESS = 20
RACE_TIERS = {
    # 25 requests per minute: one comes back every 2.4 s, far longer than the race lasts.
    "default": TierLimits(25, 1_000_000, 100),
    # 1000 tokens per minute and 100 per call: 10 calls; 100 tokens come back in 6 s.
    "premium": TierLimits(1000, 1000, 100),
}


def race_worker(url: str, tenants: tuple[str, str], barrier: Any, results: Any) -> None:
    results.put(asyncio.run(_race(url, tenants, barrier)))


async def _race(url: str, tenants: tuple[str, str], barrier: Any) -> tuple[int, int, list[str]]:
    config = RateLimitConfig(
        tiers=RACE_TIERS,
        store="redis",
        redis_url=url,
        redis_timeout_s=10.0,
        on_redis_error="closed",  # a fallback would admit locally and spoil the count
    )
    limiter = RateLimiter(config)
    requests_tenant, tokens_tenant = tenants
    failures: list[str] = []

    async def one(i: int, tenant: str, tier: str, tokens: int) -> Reservation | None:
        try:
            # Different keys per call: every call charges several buckets in one script.
            return await limiter.reserve(
                tenant=tenant, key_id=f"k{i % 3}", tier=tier, tokens=tokens, stream=True
            )
        except ResourceExhausted:
            return None
        except Exception as exc:
            failures.append(repr(exc))
            return None

    try:
        await limiter.redis.client.ping()  # type: ignore[union-attr]
        await asyncio.to_thread(barrier.wait)
        calls = [one(i, requests_tenant, "default", 0) for i in range(CALLS_PER_PROCESS)]
        calls += [one(i, tokens_tenant, "premium", 100) for i in range(CALLS_PER_PROCESS)]
        outcomes = await asyncio.gather(*calls)
        by_requests = [r for r in outcomes[:CALLS_PER_PROCESS] if r is not None]
        by_tokens = [r for r in outcomes[CALLS_PER_PROCESS:] if r is not None]
        await asyncio.to_thread(barrier.wait)  # refunds would let others in: only after the race
        for reservation in by_tokens:  # refund every token to the other processes
            await limiter.settle(reservation, used_tokens=0)
        return len(by_requests), len(by_tokens), failures
    finally:
        await limiter.close()


async def test_processes_never_admit_more_than_the_limit(redis_server: RedisServer) -> None:
    tenants = (new_tenant(), new_tenant())
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=race_worker, args=(redis_server.url, tenants, barrier, results))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = [await asyncio.to_thread(results.get, timeout=60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
    assert [failures for _, _, failures in outcomes] == [[]] * PROCESSES
    assert sum(requests for requests, _, _ in outcomes) == 25
    assert sum(tokens for _, tokens, _ in outcomes) == 10
    # Each process refunded its tokens: the whole 1000 are available again here (refill alone
    # would take a minute), and the stream slots were released.
    async with redis_limiter(redis_server, tiers=RACE_TIERS) as limiter:
        await reserve(limiter, tenants[1], tier="premium", tokens=1000)

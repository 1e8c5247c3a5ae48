"""RateLimiter on the in-process store, driven by a hand-moved clock: what a tenant is admitted,
what it is told when it is not, and what settling gives back."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from router.errors import ResourceExhausted
from router.guard.limits import RateLimitConfig, RateLimiter, Reservation, TierLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_limiter(**config: Any) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    return RateLimiter(RateLimitConfig(**config), clock=clock), clock


def small_tiers(rpm: int = 10, tpm: int = 1000, streams: int = 2) -> dict[str, TierLimits]:
    return {"default": TierLimits(rpm, tpm, streams)}


async def reserve(
    limiter: RateLimiter,
    tenant: str = "acme",
    *,
    key_id: str | None = None,
    tier: str = "default",
    tokens: int = 0,
    stream: bool = False,
) -> Reservation:
    return await limiter.reserve(
        tenant=tenant, key_id=key_id, tier=tier, tokens=tokens, stream=stream
    )


async def admitted_until_rejected(
    limiter: RateLimiter, **call: Any
) -> tuple[int, ResourceExhausted]:
    for count in range(100_000):
        try:
            await reserve(limiter, **call)
        except ResourceExhausted as exc:
            return count, exc
    raise AssertionError("never rejected")


async def test_default_tier_admits_100_requests_then_says_when_to_retry() -> None:
    limiter, _ = make_limiter()
    count, error = await admitted_until_rejected(limiter)
    assert count == 100
    assert error.retry_after_s == pytest.approx(0.6)
    assert str(error) == (
        "tenant 'acme' exceeded 100 requests per minute (tier 'default'); retry in 0.6 s"
    )
    assert error.violations == (("tenant:acme", "100 requests per minute (tier 'default')"),)


async def test_tiers_differ_and_tenants_are_independent() -> None:
    limiter, _ = make_limiter()
    assert (await admitted_until_rejected(limiter, tenant="big", tier="premium"))[0] == 1000
    assert (await admitted_until_rejected(limiter, tenant="small"))[0] == 100
    assert (await admitted_until_rejected(limiter, tenant="other"))[0] == 100


async def test_unknown_tier_gets_default_limits(caplog: pytest.LogCaptureFixture) -> None:
    limiter, _ = make_limiter()
    with caplog.at_level(logging.WARNING):
        assert (await admitted_until_rejected(limiter, tier="gold"))[0] == 100
    assert [r.getMessage() for r in caplog.records].count(
        "rate limit tier 'gold' is not configured (tiers: ['default', 'premium']); "
        "using 'default' for it"
    ) == 1


async def test_requests_refill_over_time() -> None:
    limiter, clock = make_limiter()
    await admitted_until_rejected(limiter)
    clock.advance(0.59)
    with pytest.raises(ResourceExhausted) as error:
        await reserve(limiter)
    assert error.value.retry_after_s == pytest.approx(0.01)
    clock.advance(0.01)
    await reserve(limiter)
    clock.advance(30.0)  # half a minute: half the bucket
    assert (await admitted_until_rejected(limiter))[0] == 50


async def test_tokens_are_reserved_up_front_and_unused_ones_refunded() -> None:
    limiter, _ = make_limiter(tiers=small_tiers(rpm=100, tpm=1000))
    first = await reserve(limiter, tokens=600)
    await reserve(limiter, tokens=400)
    with pytest.raises(ResourceExhausted) as error:
        await reserve(limiter, tokens=100)
    # 100 tokens at 1000 per minute take 6 s to come back.
    assert error.value.retry_after_s == pytest.approx(6.0)
    assert str(error.value) == (
        "tenant 'acme' exceeded 1000 tokens per minute (tier 'default') with this call's "
        "100 tokens; retry in 6.0 s"
    )
    assert error.value.violations == (("tenant:acme", "1000 tokens per minute (tier 'default')"),)
    await limiter.settle(first, used_tokens=250)  # 350 come back
    await reserve(limiter, tokens=350)
    with pytest.raises(ResourceExhausted):
        await reserve(limiter, tokens=1)


async def test_settle_is_idempotent() -> None:
    limiter, _ = make_limiter(tiers=small_tiers(rpm=100, tpm=1000, streams=1))
    reservation = await reserve(limiter, tokens=1000, stream=True)
    await limiter.settle(reservation, used_tokens=0)
    await limiter.settle(reservation, used_tokens=0)
    assert reservation.settled
    # Refunded once: the bucket is full (1000), not 2000; the slot was released once.
    await reserve(limiter, tokens=1000, stream=True)
    with pytest.raises(ResourceExhausted):
        await reserve(limiter, tokens=1)
    with pytest.raises(ResourceExhausted):
        await reserve(limiter, stream=True)


async def test_using_more_than_reserved_charges_the_difference() -> None:
    limiter, _ = make_limiter(tiers=small_tiers(rpm=100, tpm=1000))
    reservation = await reserve(limiter, tokens=100)
    await limiter.settle(reservation, used_tokens=300)
    unreserved = await reserve(limiter)  # e.g. a call that could not know its size up front
    await limiter.settle(unreserved, used_tokens=100)
    await reserve(limiter, tokens=600)
    with pytest.raises(ResourceExhausted):
        await reserve(limiter, tokens=1)


async def test_reservation_larger_than_the_bucket_is_rejected_at_once() -> None:
    limiter, _ = make_limiter()
    with pytest.raises(ResourceExhausted) as error:
        await reserve(limiter, tokens=100_001)
    assert "can never fit" in str(error.value)
    assert "100000 tokens per minute (tier 'default')" in str(error.value)
    assert error.value.violations[0][0] == "tenant:acme"
    # Nothing was charged: a call of the whole bucket still fits.
    await reserve(limiter, tokens=100_000)
    assert limiter.usage["acme"].rejected == 1


async def test_rejected_call_charges_no_bucket() -> None:
    limiter, _ = make_limiter(tiers=small_tiers(rpm=2, tpm=1000))
    await reserve(limiter, tokens=900)
    with pytest.raises(ResourceExhausted) as error:
        await reserve(limiter, tokens=500)  # the tokens are short, the requests are not
    assert [subject for subject, _ in error.value.violations] == ["tenant:acme"]
    await reserve(limiter)  # so the second request is still there
    with pytest.raises(ResourceExhausted):
        await reserve(limiter)


async def test_each_api_key_and_its_tenant_are_both_limited() -> None:
    limiter, _ = make_limiter(tiers=small_tiers(rpm=10), key_share=0.5)
    count, error = await admitted_until_rejected(limiter, key_id="k1")
    assert count == 5
    assert error.violations == (("api_key:k1", "5 requests per minute per key (tier 'default')"),)
    assert "api key 'k1' of tenant 'acme' exceeded 5 requests per minute per key" in str(error)
    # Another key has its own share, until the tenant's whole limit is used.
    count, error = await admitted_until_rejected(limiter, key_id="k2")
    assert count == 5
    assert {subject for subject, _ in error.violations} == {"tenant:acme", "api_key:k2"}
    # Calls without a key (e.g. a JWT) are held by the tenant limit alone.
    with pytest.raises(ResourceExhausted) as error_info:
        await reserve(limiter)
    assert error_info.value.violations == (
        ("tenant:acme", "10 requests per minute (tier 'default')"),
    )


async def test_key_with_the_whole_share_keeps_no_buckets_of_its_own() -> None:
    # At key_share=1.0 a key can never run out before its tenant: its buckets would be waste.
    limiter, _ = make_limiter(tiers=small_tiers(rpm=10))
    count, error = await admitted_until_rejected(limiter, key_id="k1", tokens=10)
    assert count == 10
    assert [subject for subject, _ in error.violations] == ["tenant:acme"]
    assert len(limiter._local) == 2  # the tenant's request and token buckets


async def test_per_key_off_limits_only_the_tenant() -> None:
    limiter, _ = make_limiter(tiers=small_tiers(rpm=10), key_share=0.5, per_key=False)
    assert (await admitted_until_rejected(limiter, key_id="k1"))[0] == 10


async def test_key_share_also_bounds_one_reservation() -> None:
    limiter, _ = make_limiter(tiers=small_tiers(tpm=1000), key_share=0.25)
    with pytest.raises(ResourceExhausted) as error:
        await reserve(limiter, key_id="k1", tokens=300)
    assert error.value.violations[0][0] == "api_key:k1"
    assert "can never fit" in str(error.value)
    await reserve(limiter, key_id="k1", tokens=250)


async def test_stream_cap_holds_until_a_stream_settles() -> None:
    limiter, _ = make_limiter()
    streams = [await reserve(limiter, stream=True) for _ in range(16)]
    with pytest.raises(ResourceExhausted) as error:
        await reserve(limiter, stream=True)
    assert error.value.violations == (("tenant:acme", "16 concurrent streams (tier 'default')"),)
    assert "tenant 'acme' already has 16 concurrent streams (tier 'default') open" in str(
        error.value
    )
    await reserve(limiter)  # unary calls are not capped by open streams
    await limiter.settle(streams[0], used_tokens=0)
    await reserve(limiter, stream=True)


async def test_usage_counters_split_prompt_and_completion() -> None:
    limiter, _ = make_limiter()
    reservation = await limiter.reserve(
        tenant="acme", key_id="k1", tier="default", tokens=300, stream=False, prompt_tokens=40
    )
    await limiter.settle(reservation, used_tokens=100)
    failed_early = await limiter.reserve(
        tenant="acme", key_id="k1", tier="default", tokens=300, stream=False, prompt_tokens=40
    )
    await limiter.settle(failed_early, used_tokens=0)
    with pytest.raises(ResourceExhausted):
        await reserve(limiter, tokens=10**9)
    usage = limiter.usage["acme"]
    assert (usage.requests, usage.rejected) == (2, 1)
    assert (usage.prompt_tokens, usage.completion_tokens) == (40, 60)
    assert limiter.redis_errors == limiter.fallbacks == 0


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"tiers": {"premium": TierLimits(1, 1, 1)}}, "no 'default' tier"),
        ({"tiers": {"default": TierLimits(0, 1, 1)}}, "tiers['default'].requests_per_minute=0"),
        ({"store": "etcd"}, "rate_limit.store='etcd'"),
        ({"store": "redis"}, "rate_limit.redis_url"),
        ({"on_redis_error": "maybe"}, "rate_limit.on_redis_error='maybe'"),
        ({"redis_timeout_s": 0}, "rate_limit.redis_timeout_s=0"),
        ({"key_share": 1.5}, "rate_limit.key_share=1.5"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as error:
        RateLimitConfig(**config).validate()
    assert key in str(error.value)


def test_default_config_is_valid_and_has_both_tiers() -> None:
    config = RateLimitConfig()
    config.validate()
    assert config.tiers["default"] == TierLimits(100, 100_000, 16)
    assert config.tiers["premium"] == TierLimits(1000, 1_000_000, 64)

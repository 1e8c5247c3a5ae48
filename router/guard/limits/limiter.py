"""`RateLimiter`: admits a call against its tenant's (and API key's) buckets, or raises
ResourceExhausted naming each limit it would exceed and when to retry.

Every call charges 1 request and reserves prompt + max_tokens tokens up front, so concurrent calls
cannot overshoot a token quota together; `settle` refunds what the call did not use and releases
its stream slot. With store='redis' the buckets are shared by all replicas; when Redis fails or
is slower than redis_timeout_s the call either uses this replica's own buckets (fail open) or is
refused with UNAVAILABLE (fail closed), and Redis is left alone for redis_cooldown_s.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from router.errors import Unavailable
from router.guard.limits.buckets import Bucket, LimitStore, Rejection, StreamSlot
from router.guard.limits.config import RateLimitConfig, TierPlan
from router.guard.limits.memory_store import MemoryStore
from router.guard.limits.redis_store import RedisStore
from router.guard.limits.rejections import oversize_error, rejection_error

logger = logging.getLogger(__name__)

_WARN_INTERVAL_S = 30.0
"""At most one warning per this long while Redis is failing; the counters keep the full count."""
_REDIS_FAILURES = (RedisError, OSError, TimeoutError)


@dataclass(slots=True)
class TenantUsage:
    """What one tenant used through this replica (for metrics; sum over replicas)."""

    requests: int = 0
    """Calls admitted."""
    rejected: int = 0
    """Calls refused by a rate limit."""
    prompt_tokens: int = 0
    """Prompt tokens of settled calls."""
    completion_tokens: int = 0
    """Tokens settled beyond the prompt."""


class Reservation:
    """What one admitted call holds until `RateLimiter.settle`: its reserved tokens and, for a
    stream, a concurrent-stream slot."""

    __slots__ = (
        "_buckets",
        "_slot",
        "_store",
        "key_id",
        "prompt_tokens",
        "settled",
        "stream",
        "tenant",
        "tier",
        "tokens",
    )

    def __init__(
        self,
        *,
        tenant: str,
        key_id: str | None,
        tier: str,
        tokens: int,
        prompt_tokens: int,
        stream: bool,
        buckets: tuple[Bucket, ...],
        slot: StreamSlot | None,
        store: LimitStore,
    ) -> None:
        self.tenant = tenant
        self.key_id = key_id
        self.tier = tier
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.stream = stream
        self.settled = False
        self._buckets = buckets  # the token buckets charged, to refund
        self._slot = slot
        self._store = store  # the store that charged it: a fail-open call refunds locally

    def __repr__(self) -> str:
        return (
            f"Reservation(tenant={self.tenant!r}, key_id={self.key_id!r}, tier={self.tier!r}, "
            f"tokens={self.tokens}, stream={self.stream}, settled={self.settled})"
        )


def _redis_target(url: str) -> str:
    """host:port (or socket path) of a Redis URL, without the password, for messages."""
    parts = urlsplit(url)
    if parts.hostname:
        return f"{parts.hostname}:{parts.port or 6379}"
    return parts.path or "redis"


class RateLimiter:
    """Requests and tokens per minute, and open streams, per tenant and per API key."""

    def __init__(
        self,
        config: RateLimitConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or RateLimitConfig()
        self.config.validate()
        self._clock = clock
        self._local = MemoryStore(clock)
        self._redis: RedisStore | None = None
        self._redis_target = ""
        if self.config.store == "redis":
            self._redis = RedisStore(
                self.config.redis_url,
                timeout_s=self.config.redis_timeout_s,
                slot_ttl_s=self.config.stream_slot_ttl_s,
            )
            self._redis_target = _redis_target(self.config.redis_url)
        self._redis_skip_until = float("-inf")
        self._redis_last_error = ""
        self._next_warning = float("-inf")
        self._failures_since_warning = 0
        self._plans = {
            name: TierPlan.of(lim, self.config) for name, lim in self.config.tiers.items()
        }
        self._replica = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self.redis_errors = 0
        """Redis operations that failed or timed out (a counter for metrics)."""
        self.fallbacks = 0
        """Calls admitted against this replica's own buckets because Redis was unavailable."""
        self.usage: dict[str, TenantUsage] = {}
        """Per-tenant usage through this replica, by tenant."""

    @property
    def redis(self) -> RedisStore | None:
        return self._redis

    async def reserve(
        self,
        *,
        tenant: str,
        key_id: str | None,
        tier: str,
        tokens: int,
        stream: bool,
        prompt_tokens: int = 0,
    ) -> Reservation:
        """Admit one call that may use up to `tokens` tokens (prompt + max_tokens) or raise
        ResourceExhausted (nothing charged). `prompt_tokens` only splits the usage counters."""
        plan = self._plan(tier)
        limits = plan.limits
        tokens = max(tokens, 0)
        per_key = self.config.per_key and key_id is not None
        if tokens > limits.tokens_per_minute or (per_key and tokens > plan.key_tokens):
            self._usage(tenant).rejected += 1
            raise oversize_error(tenant, key_id if per_key else None, tier, plan, tokens)
        # Every key of a tenant carries the hash tag {tenant}, so one script's keys share a
        # Redis Cluster slot. Token buckets sit at odd positions (settle refunds those).
        base = f"irouter:rl:{{{tenant}}}"
        buckets = [Bucket(base + ":req", plan.req_interval, 1)]
        if tokens:
            buckets.append(Bucket(base + ":tok", plan.tok_interval, tokens))
        if per_key:
            buckets.append(Bucket(f"{base}:key:{key_id}:req", plan.key_req_interval, 1))
            if tokens:
                buckets.append(Bucket(f"{base}:key:{key_id}:tok", plan.key_tok_interval, tokens))
        slot = None
        if stream:
            member = f"{self._replica}:{next(self._ids)}"
            slot = StreamSlot(base + ":streams", limits.max_concurrent_streams, member)
        store, rejection = await self._charge(buckets, slot)
        usage = self._usage(tenant)
        if rejection is not None:
            usage.rejected += 1
            raise rejection_error(
                tenant, key_id if per_key else None, tier, plan, tokens, rejection
            )
        usage.requests += 1
        return Reservation(
            tenant=tenant,
            key_id=key_id,
            tier=tier,
            tokens=tokens,
            prompt_tokens=prompt_tokens,
            stream=stream,
            buckets=tuple(buckets[1::2]) if tokens else (),
            slot=slot,
            store=store,
        )

    async def settle(self, reservation: Reservation, *, used_tokens: int) -> None:
        """Refund the tokens the call reserved but did not use and release its stream slot.
        Idempotent, and never raises: it runs in `finally` blocks. A refund Redis cannot take is
        lost (the bucket refills anyway) and the slot is freed by its TTL."""
        if reservation.settled:
            return
        reservation.settled = True
        used = max(used_tokens, 0)
        usage = self._usage(reservation.tenant)
        prompt = min(reservation.prompt_tokens, used)
        usage.prompt_tokens += prompt
        usage.completion_tokens += used - prompt
        unused = reservation.tokens - used
        buckets = (
            [Bucket(b.key, b.interval_s, unused) for b in reservation._buckets] if unused else []
        )
        slot = reservation._slot
        if not buckets and slot is None:
            return
        store = reservation._store
        if store is self._local:
            self._local.refund_now(buckets, slot)
            return
        if self._clock() < self._redis_skip_until:
            return
        try:
            async with asyncio.timeout(self.config.redis_timeout_s):
                await store.refund(buckets, slot)
        except _REDIS_FAILURES as exc:
            self._redis_failed(exc, "refund")

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
        await self._local.close()

    async def _charge(
        self, buckets: list[Bucket], slot: StreamSlot | None
    ) -> tuple[LimitStore, Rejection | None]:
        redis = self._redis
        if redis is None:
            return self._local, self._local.charge_now(buckets, slot)
        if self._clock() >= self._redis_skip_until:
            try:
                async with asyncio.timeout(self.config.redis_timeout_s):
                    return redis, await redis.charge(buckets, slot)
            except _REDIS_FAILURES as exc:
                # A timed-out script may still have run: that call is then charged in Redis as
                # well as locally, erring towards the limit.
                self._redis_failed(exc, "charge")
        if self.config.on_redis_error == "closed":
            raise Unavailable(f"rate limiter unavailable: {self._redis_last_error}")
        self.fallbacks += 1
        return self._local, self._local.charge_now(buckets, slot)

    def _redis_failed(self, exc: BaseException, what: str) -> None:
        self.redis_errors += 1
        self._failures_since_warning += 1
        now = self._clock()
        self._redis_skip_until = now + self.config.redis_cooldown_s
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {self.config.redis_timeout_s:g} s"
        else:
            detail = str(exc) or type(exc).__name__
        self._redis_last_error = f"redis at {self._redis_target} failed ({what}): {detail}"
        if now >= self._next_warning:
            self._next_warning = now + _WARN_INTERVAL_S
            mode = (
                "limits are per replica (on_redis_error='open')"
                if self.config.on_redis_error == "open"
                else "calls get UNAVAILABLE (on_redis_error='closed')"
            )
            logger.warning(
                "%s; %s; %d failure(s) since the last warning, Redis retried after %g s",
                self._redis_last_error,
                mode,
                self._failures_since_warning,
                self.config.redis_cooldown_s,
            )
            self._failures_since_warning = 0

    def _plan(self, tier: str) -> TierPlan:
        plan = self._plans.get(tier)
        if plan is not None:
            return plan
        logger.warning(
            "rate limit tier %r is not configured (tiers: %s); using 'default' for it",
            tier,
            sorted(self.config.tiers),
        )
        # Remember the answer so the warning is logged once per unknown tier.
        plan = self._plans[tier] = self._plans["default"]
        return plan

    def _usage(self, tenant: str) -> TenantUsage:
        usage = self.usage.get(tenant)
        if usage is None:
            usage = self.usage[tenant] = TenantUsage()
        return usage

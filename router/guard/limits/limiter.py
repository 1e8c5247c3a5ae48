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
from typing import NamedTuple
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


class _Route(NamedTuple):
    """Everything reserve() needs for one (tenant, key, tier), built on its first call."""

    tenant: str
    key_id: str | None
    """The key whose buckets are charged; None when per_key is off, key_share is 1.0 or the call
    has no key."""
    tier: str
    plan: TierPlan
    request_buckets: tuple[Bucket, ...]
    """Requests only (a call without tokens): tenant, then key."""
    all_buckets: tuple[Bucket, ...]
    """Tenant requests, tenant tokens, then key requests, key tokens."""
    token_buckets: tuple[Bucket, ...]
    """The token buckets of all_buckets, which settle refunds."""
    streams_key: str
    usage: TenantUsage


_MAX_ROUTES = 100_000
"""Routes kept before the cache starts over (a cheap bound on memory, not an LRU)."""


class Reservation:
    """What one admitted call holds until `RateLimiter.settle`: its reserved tokens and, for a
    stream, a concurrent-stream slot."""

    __slots__ = ("_route", "_slot", "_store", "prompt_tokens", "settled", "tokens")

    def __init__(
        self,
        route: _Route,
        tokens: int,
        prompt_tokens: int,
        slot: StreamSlot | None,
        store: LimitStore,
    ) -> None:
        self._route = route
        self.tokens = tokens
        """Tokens reserved (prompt + max_tokens)."""
        self.prompt_tokens = prompt_tokens
        self._slot = slot
        self._store = store  # the store that charged it: a fail-open call refunds locally
        self.settled = False

    @property
    def tenant(self) -> str:
        return self._route.tenant

    @property
    def key_id(self) -> str | None:
        return self._route.key_id

    @property
    def tier(self) -> str:
        return self._route.tier

    @property
    def stream(self) -> bool:
        return self._slot is not None

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
        redis: RedisStore | None = None,
    ) -> None:
        """`redis`: a store another limiter already opened on config.redis_url, to share its
        connections (the caller closes it); None opens one when config.store is 'redis'."""
        self.config = config or RateLimitConfig()
        self.config.validate()
        self._clock = clock
        self._local = MemoryStore(clock)
        self._redis: RedisStore | None = None
        self._redis_target = ""
        self._owns_redis = redis is None
        if self.config.store == "redis":
            self._redis = redis or RedisStore(
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
        self._routes: dict[tuple[str, str | None, str], _Route] = {}
        self._replica = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self.redis_errors = 0
        """Redis operations that failed or timed out (a counter for metrics)."""
        self.fallbacks = 0
        """Calls checked against this replica's own buckets because Redis was unavailable."""
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
        route = self._routes.get((tenant, key_id, tier)) or self._route(tenant, key_id, tier)
        if tokens > 0:
            plan = route.plan
            if tokens > plan.limits.tokens_per_minute or (
                route.key_id is not None and tokens > plan.key_tokens
            ):
                route.usage.rejected += 1
                raise oversize_error(tenant, route.key_id, tier, plan, tokens)
            buckets = route.all_buckets
            amounts: tuple[int, ...] = (
                (1, tokens, 1, tokens) if route.key_id is not None else (1, tokens)
            )
        else:
            tokens = 0
            buckets = route.request_buckets
            amounts = (1, 1) if route.key_id is not None else (1,)
        slot = None
        if stream:
            member = f"{self._replica}:{next(self._ids)}"
            slot = StreamSlot(route.streams_key, route.plan.limits.max_concurrent_streams, member)
        if self._redis is None:
            store: LimitStore = self._local
            rejection = self._local.charge_now(buckets, amounts, slot)
        else:
            store, rejection = await self._charge_redis(self._redis, buckets, amounts, slot)
        if rejection is not None:
            route.usage.rejected += 1
            raise rejection_error(tenant, route.key_id, tier, route.plan, tokens, rejection)
        route.usage.requests += 1
        return Reservation(route, tokens, prompt_tokens, slot, store)

    async def settle(self, reservation: Reservation, *, used_tokens: int) -> None:
        """Refund the tokens the call reserved but did not use and release its stream slot.
        Idempotent, and never raises: it runs in `finally` blocks. A refund Redis cannot take is
        lost (the bucket refills anyway) and the slot is freed by its TTL."""
        if reservation.settled:
            return
        reservation.settled = True
        route = reservation._route
        used = used_tokens if used_tokens > 0 else 0
        prompt = min(reservation.prompt_tokens, used)
        route.usage.prompt_tokens += prompt
        route.usage.completion_tokens += used - prompt
        unused = reservation.tokens - used
        buckets = route.token_buckets if unused else ()
        slot = reservation._slot
        if not buckets and slot is None:
            return
        amounts = (unused,) * len(buckets)
        store = reservation._store
        if store is self._local:
            self._local.refund_now(buckets, amounts, slot)
            return
        if self._clock() < self._redis_skip_until:
            return
        try:
            async with asyncio.timeout(self.config.redis_timeout_s):
                await store.refund(buckets, amounts, slot)
        except _REDIS_FAILURES as exc:
            self._redis_failed(exc, "refund")

    async def close(self) -> None:
        if self._redis is not None and self._owns_redis:
            await self._redis.close()
        await self._local.close()

    async def _charge_redis(
        self,
        redis: RedisStore,
        buckets: tuple[Bucket, ...],
        amounts: tuple[int, ...],
        slot: StreamSlot | None,
    ) -> tuple[LimitStore, Rejection | None]:
        if self._clock() >= self._redis_skip_until:
            try:
                async with asyncio.timeout(self.config.redis_timeout_s):
                    rejection = await redis.charge(buckets, amounts, slot)
                if self._redis_last_error:
                    logger.info("redis at %s answers again; limits are global", self._redis_target)
                    self._redis_last_error = ""
                return redis, rejection
            except _REDIS_FAILURES as exc:
                # A timed-out script may still have run: that call is then charged in Redis as
                # well as locally, erring towards the limit.
                self._redis_failed(exc, "charge")
        if self.config.on_redis_error == "closed":
            raise Unavailable(f"rate limiter unavailable: {self._redis_last_error}")
        self.fallbacks += 1
        return self._local, self._local.charge_now(buckets, amounts, slot)

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

    def _route(self, tenant: str, key_id: str | None, tier: str) -> _Route:
        cache_key = (tenant, key_id, tier)
        plan = self._plan(tier)
        usage = self.usage.get(tenant)
        if usage is None:
            usage = self.usage[tenant] = TenantUsage()
        # Every key of a tenant carries the hash tag {tenant}, so one script's keys share a
        # Redis Cluster slot. Keys do not name the tier: a tenant moved to another tier keeps
        # its debt (in seconds), and its new limits apply from the next call.
        space = f":{self.config.namespace}" if self.config.namespace else ""
        base = f"irouter:rl{space}:{{{tenant}}}"
        requests = [Bucket(f"{base}:req", plan.req_interval)]
        tokens = [Bucket(f"{base}:tok", plan.tok_interval)]
        if not self.config.per_key or self.config.key_share >= 1.0:
            # A key with its tenant's whole limit can never run out before its tenant does
            # (every call charges both alike), so its buckets would only cost time and keys.
            key_id = None
        if key_id is not None:
            requests.append(Bucket(f"{base}:key:{key_id}:req", plan.key_req_interval))
            tokens.append(Bucket(f"{base}:key:{key_id}:tok", plan.key_tok_interval))
        route = _Route(
            tenant=tenant,
            key_id=key_id,
            tier=tier,
            plan=plan,
            request_buckets=tuple(requests),
            all_buckets=tuple(b for pair in zip(requests, tokens, strict=True) for b in pair),
            token_buckets=tuple(tokens),
            streams_key=f"{base}:streams",
            usage=usage,
        )
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        self._routes[cache_key] = route
        return route

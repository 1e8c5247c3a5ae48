"""Rate-limit configuration: per-tier limits and where the buckets live."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

from router.guard.limits.buckets import WINDOW_S

StoreKind = Literal["memory", "redis"]
OnRedisError = Literal["open", "closed"]
STORE_KINDS: tuple[StoreKind, ...] = ("memory", "redis")
ON_REDIS_ERROR: tuple[OnRedisError, ...] = ("open", "closed")


@dataclass(frozen=True, slots=True)
class TierLimits:
    """What one service tier may use; every tenant (and API key) gets its own buckets."""

    requests_per_minute: int
    """Calls admitted per minute; also the burst a fresh bucket admits at once."""
    tokens_per_minute: int
    """Prompt plus completion tokens per minute; a call reserves prompt + max_tokens up front."""
    max_concurrent_streams: int
    """Streaming calls one tenant may have open at once."""

    def validate(self, where: str = "rate_limit.tiers[...]") -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent_streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}.{name}={value!r} must be a positive integer")


def _default_tiers() -> Mapping[str, TierLimits]:
    return MappingProxyType(
        {
            "default": TierLimits(
                requests_per_minute=100, tokens_per_minute=100_000, max_concurrent_streams=16
            ),
            "premium": TierLimits(
                requests_per_minute=1000, tokens_per_minute=1_000_000, max_concurrent_streams=64
            ),
        }
    )


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Requests, tokens and open streams per tenant (and per API key), by service tier."""

    tiers: Mapping[str, TierLimits] = field(default_factory=_default_tiers)
    """Limits by tier name; 'default' is required and serves callers whose tier is unknown."""
    per_key: bool = True
    """Also limit each API key, to key_share of its tenant's tier, so one leaked key cannot
    drain its tenant."""
    key_share: float = 1.0
    """Share of the tier's requests and tokens per minute each API key gets when per_key is on.
    At 1.0 a key could never run out before its tenant, so no key buckets are kept at all; at
    0.25 one key can take at most a quarter of its tenant's quota."""
    store: StoreKind = "memory"
    """'memory': exact for one router process; 'redis': shared by every replica (redis_url)."""
    redis_url: str = ""
    """redis://[:password@]host:port/db (or rediss://, unix://); required when store='redis'."""
    redis_timeout_s: float = 0.05
    """Longest wait for Redis per call before on_redis_error applies."""
    on_redis_error: OnRedisError = "open"
    """'open': use this replica's own buckets (limits become per replica); 'closed': UNAVAILABLE."""
    redis_cooldown_s: float = 1.0
    """After a Redis failure, skip Redis this long so a dead server does not slow every call."""
    stream_slot_ttl_s: float = 3600.0
    """A Redis stream slot not released by then is freed (a crashed replica's slots); the longest
    stream expected."""
    namespace: str = ""
    """Set by the router, not in config files: keeps a limiter's counters apart from others
    sharing the Redis (a deployment's own limits beside the guard's global ones)."""

    def validate(self) -> None:
        if "default" not in self.tiers:
            raise ValueError(
                f"rate_limit.tiers has no 'default' tier (has {sorted(self.tiers)}); add one"
            )
        for name, limits in self.tiers.items():
            if not isinstance(limits, TierLimits):
                raise ValueError(f"rate_limit.tiers[{name!r}] must be a TierLimits")
            limits.validate(f"rate_limit.tiers[{name!r}]")
        if self.store not in STORE_KINDS:
            raise ValueError(
                f"rate_limit.store={self.store!r} is unknown; use one of {STORE_KINDS}"
            )
        if self.store == "redis" and not self.redis_url:
            raise ValueError("rate_limit.redis_url is empty; store='redis' needs a redis:// URL")
        if self.on_redis_error not in ON_REDIS_ERROR:
            raise ValueError(
                f"rate_limit.on_redis_error={self.on_redis_error!r} is unknown; "
                f"use one of {ON_REDIS_ERROR}"
            )
        for name in ("redis_timeout_s", "stream_slot_ttl_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"rate_limit.{name}={value!r} must be a positive number")
        share = self.key_share
        if not (isinstance(share, int | float) and 0 < share <= 1):
            raise ValueError(f"rate_limit.key_share={share!r} must be in (0, 1]")
        cooldown = self.redis_cooldown_s
        if not (isinstance(cooldown, int | float) and math.isfinite(cooldown) and cooldown >= 0):
            raise ValueError(f"rate_limit.redis_cooldown_s={cooldown!r} must be >= 0")

    def key_limits(self, limits: TierLimits) -> tuple[int, int]:
        """(requests, tokens) per minute of one API key of a tenant with these limits."""
        return (
            max(1, int(limits.requests_per_minute * self.key_share)),
            max(1, int(limits.tokens_per_minute * self.key_share)),
        )


class TierPlan(NamedTuple):
    """A tier's limits turned into what reserve() needs per call, computed once."""

    limits: TierLimits
    key_requests: int
    key_tokens: int
    req_interval: float
    tok_interval: float
    key_req_interval: float
    key_tok_interval: float

    @classmethod
    def of(cls, limits: TierLimits, config: RateLimitConfig) -> TierPlan:
        key_requests, key_tokens = config.key_limits(limits)
        return cls(
            limits,
            key_requests,
            key_tokens,
            WINDOW_S / limits.requests_per_minute,
            WINDOW_S / limits.tokens_per_minute,
            WINDOW_S / key_requests,
            WINDOW_S / key_tokens,
        )

    def requests_limit(self, *, per_key: bool = False) -> str:
        if per_key:
            return f"{self.key_requests} requests per minute per key"
        return f"{self.limits.requests_per_minute} requests per minute"

    def tokens_limit(self, *, per_key: bool = False) -> str:
        if per_key:
            return f"{self.key_tokens} tokens per minute per key"
        return f"{self.limits.tokens_per_minute} tokens per minute"

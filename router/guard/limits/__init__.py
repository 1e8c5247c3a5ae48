"""Rate limits and token quotas: requests and tokens per minute and open streams, per tenant and
per API key, in this process or shared through Redis."""

from __future__ import annotations

from router.guard.limits.config import RateLimitConfig, TierLimits
from router.guard.limits.limiter import RateLimiter, Reservation, TenantUsage
from router.guard.limits.memory_store import MemoryStore
from router.guard.limits.redis_store import RedisStore

__all__ = [
    "MemoryStore",
    "RateLimitConfig",
    "RateLimiter",
    "RedisStore",
    "Reservation",
    "TenantUsage",
    "TierLimits",
]

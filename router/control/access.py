"""Who may call a deployment, and how often: its own authentication requirement and per-tier
frequency limits and token quotas, on top of the router's guard.

A deployment that requires authentication refuses anonymous callers (the guard's
`allow_anonymous` still serves them everything else); its limits count each tenant's calls and
tokens to this deployment alone, by the caller's service tier (the guard's own limits, global
per tenant, apply as well): in Redis, shared by every router, when the guard's rate limiter keeps
its buckets there (same server and failure policy, keys of their own), else in this router's
memory. Both need the guard on: without it no caller has an identity to check or count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from router.errors import Unauthenticated
from router.guard.chain import CallScope
from router.guard.identity import ANONYMOUS_SUBJECT
from router.guard.limits.config import RateLimitConfig, TierLimits
from router.guard.limits.limiter import RateLimiter, Reservation


class DeploymentAccess:
    """One deployment's rules, checked when a call resolves to it."""

    def __init__(
        self,
        name: str,
        require_auth: bool,
        limits: Mapping[str, TierLimits],
        *,
        guard_limiter: RateLimiter | None = None,
    ) -> None:
        """`guard_limiter`: the guard's rate limiter, whose Redis (when it uses one) this
        deployment's limits share."""
        self.name = name
        self.require_auth = require_auth
        self.limits = dict(limits)
        self._limiter: RateLimiter | None = None
        if not limits:
            return
        config = RateLimitConfig(tiers=dict(limits), per_key=False)
        shared = None
        if guard_limiter is not None and guard_limiter.redis is not None:
            shared, g = guard_limiter.redis, guard_limiter.config
            config = dataclasses.replace(
                config,
                store="redis",
                redis_url=g.redis_url,
                redis_timeout_s=g.redis_timeout_s,
                on_redis_error=g.on_redis_error,
                redis_cooldown_s=g.redis_cooldown_s,
                stream_slot_ttl_s=g.stream_slot_ttl_s,
                namespace=f"deployment:{name}",
            )
        self._limiter = RateLimiter(config, redis=shared)

    def same_rules(self, require_auth: bool, limits: Mapping[str, TierLimits]) -> bool:
        """Whether these are its rules already (then its counters are kept)."""
        return self.require_auth == require_auth and self.limits == dict(limits)

    def check(self, scope: CallScope) -> None:
        """Refuse an anonymous caller when authentication is required; charge the limits when
        the call is admitted (its tokens known), refund what it did not use when it ends."""
        identity = scope.identity
        if self.require_auth and (identity is None or identity.method == "anonymous"):
            raise Unauthenticated(
                f"deployment {self.name!r} serves authenticated callers only; send an API key "
                "('authorization: Bearer irk_...') or a JWT"
            )
        if self._limiter is not None:
            scope.admit_hooks.append(self._admit)

    async def _admit(self, scope: CallScope, tokens: int, stream: bool) -> None:
        assert self._limiter is not None
        identity = scope.identity
        tenant = identity.tenant if identity is not None else ANONYMOUS_SUBJECT
        tier = identity.tier if identity is not None else "default"
        reservation = await self._limiter.reserve(
            tenant=tenant,
            key_id=None,
            tier=tier if tier in self._limiter.config.tiers else "default",
            tokens=tokens,
            stream=stream,
            prompt_tokens=scope.prompt_tokens,
        )
        limiter = self._limiter

        async def settle(done: CallScope, held: Reservation = reservation) -> None:
            await limiter.settle(held, used_tokens=done.prompt_tokens + done.completion_tokens)

        scope.settle_hooks.append(settle)

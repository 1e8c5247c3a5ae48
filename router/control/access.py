"""Who may call a deployment, and how often: its own authentication requirement and per-tier
frequency limits and token quotas, on top of the router's guard.

A deployment that requires authentication refuses anonymous callers (the guard's
`allow_anonymous` still serves them everything else); its limits count each tenant's calls and
tokens to this deployment alone, by the caller's service tier, in this router's memory (the
guard's own limits, global per tenant, apply as well). Both need the guard on: without it no
caller has an identity to check or count.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.errors import Unauthenticated
from router.guard.chain import CallScope
from router.guard.identity import ANONYMOUS_SUBJECT
from router.guard.limits.config import RateLimitConfig, TierLimits
from router.guard.limits.limiter import RateLimiter, Reservation


class DeploymentAccess:
    """One deployment's rules, checked when a call resolves to it."""

    def __init__(self, name: str, require_auth: bool, limits: Mapping[str, TierLimits]) -> None:
        self.name = name
        self.require_auth = require_auth
        self._limiter = (
            RateLimiter(RateLimitConfig(tiers=dict(limits), per_key=False)) if limits else None
        )

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

"""The ResourceExhausted errors the rate limiter raises: a message that names each limit hit and
when to retry, plus google.rpc.QuotaFailure violations (subject, description)."""

from __future__ import annotations

from router.errors import ResourceExhausted
from router.guard.limits.buckets import Rejection
from router.guard.limits.config import TierPlan

STREAM_RETRY_S = 1.0
"""Retry hint when the stream cap is hit: when a stream ends cannot be known."""
OVERSIZE_RETRY_S = 60.0
"""Retry hint for a reservation larger than a whole bucket: retrying cannot help, so a client
that retries anyway is told to wait a full window rather than to hammer."""


def oversize_error(
    tenant: str, key_id: str | None, tier: str, plan: TierPlan, tokens: int
) -> ResourceExhausted:
    if tokens > plan.limits.tokens_per_minute:
        name, subject, limit = f"tenant {tenant!r}", f"tenant:{tenant}", plan.tokens_limit()
    else:
        name, subject = f"api key {key_id!r} of tenant {tenant!r}", f"api_key:{key_id}"
        limit = plan.tokens_limit(per_key=True)
    limit = f"{limit} (tier {tier!r})"
    return ResourceExhausted(
        f"a call reserving {tokens} tokens (prompt + max_tokens) can never fit the limit of "
        f"{name}, {limit}; lower max_tokens or shorten the prompt",
        retry_after_s=OVERSIZE_RETRY_S,
        violations=((subject, f"{tokens} tokens requested in one call; limit {limit}"),),
    )


def rejection_error(
    tenant: str,
    key_id: str | None,
    tier: str,
    plan: TierPlan,
    tokens: int,
    rejection: Rejection,
) -> ResourceExhausted:
    # The same order as the buckets reserve() built: tenant requests, [tenant tokens], then
    # the same for the key.
    described = [(f"tenant {tenant!r}", f"tenant:{tenant}", plan.requests_limit())]
    if tokens:
        described.append((f"tenant {tenant!r}", f"tenant:{tenant}", plan.tokens_limit()))
    if key_id is not None:
        key = (f"api key {key_id!r} of tenant {tenant!r}", f"api_key:{key_id}")
        described.append((*key, plan.requests_limit(per_key=True)))
        if tokens:
            described.append((*key, plan.tokens_limit(per_key=True)))
    parts: list[str] = []
    violations: list[tuple[str, str]] = []
    for (name, subject, limit), wait in zip(described, rejection.waits, strict=True):
        if wait > 0.0:
            extra = f" with this call's {tokens} tokens" if "tokens" in limit else ""
            parts.append(f"{name} exceeded {limit} (tier {tier!r}){extra}")
            violations.append((subject, f"{limit} (tier {tier!r})"))
    if rejection.streams_full:
        cap = f"{plan.limits.max_concurrent_streams} concurrent streams (tier {tier!r})"
        parts.append(f"tenant {tenant!r} already has {cap} open")
        violations.append((f"tenant:{tenant}", cap))
    retry = max((*rejection.waits, STREAM_RETRY_S if rejection.streams_full else 0.0))
    return ResourceExhausted(
        f"{'; '.join(parts)}; retry in {_seconds(retry)} s",
        retry_after_s=retry,
        violations=tuple(violations),
    )


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1.0 else f"{value:.2g}"

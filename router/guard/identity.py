"""Who is calling: the `Identity` an authenticated call carries, the context variable handlers read
it from, and the two authentication errors.

The auth link sets `current_identity` for the duration of one call (`bind_identity`);
handlers, the scope check, rate limits and the audit log read it with `get_identity()` or
`require_identity()` instead of taking it as a parameter through every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from router.errors import PermissionDenied, Unauthenticated

AuthMethod = Literal["jwt", "api_key", "mtls", "anonymous"]


@dataclass(frozen=True, slots=True)
class Identity:
    """The verified caller of one request."""

    subject: str
    """Who: the JWT `sub`, the API key's id, or 'anonymous'."""
    tenant: str
    """The tenant the call is billed and rate-limited to."""
    scopes: frozenset[str]
    """What the caller may do, e.g. {'generate', 'embed'}."""
    method: AuthMethod
    """How the caller proved who they are."""
    key_id: str | None = None
    """The API key's id (method 'api_key'), or the JWT's signing key id; never a secret."""
    tier: str = "default"
    """Service tier (priority, quotas) the scheduler and rate limiter apply."""
    expires_at: float | None = None
    """Unix time after which the credential is no longer valid (JWT `exp`); None: no expiry."""

    def has_scopes(self, required: Iterable[str]) -> bool:
        return self.scopes.issuperset(required)

    def missing_scopes(self, required: Iterable[str]) -> frozenset[str]:
        return frozenset(required) - self.scopes


ANONYMOUS_SUBJECT = "anonymous"

current_identity: ContextVar[Identity | None] = ContextVar("irouter_identity", default=None)
"""The identity of the call being served; None outside a call or before authentication."""


def get_identity() -> Identity | None:
    return current_identity.get()


def require_identity() -> Identity:
    """The current caller; raises Unauthenticated where no identity was bound (a handler reached
    without the auth link is a wiring bug, and must not run as nobody)."""
    identity = current_identity.get()
    if identity is None:
        raise Unauthenticated("the call is not authenticated")
    return identity


def require_scopes(identity: Identity, *required: str) -> None:
    """Raise PermissionDenied naming the scopes `identity` lacks."""
    missing = identity.missing_scopes(required)
    if missing:
        raise PermissionDenied(
            f"caller '{identity.subject}' of tenant '{identity.tenant}' lacks scope(s) "
            f"{', '.join(sorted(missing))} (has: {', '.join(sorted(identity.scopes)) or 'none'})"
        )


@contextlib.contextmanager
def bind_identity(identity: Identity) -> Iterator[Identity]:
    """Set `current_identity` for the body and restore the previous value after it, so a
    reused task or thread never carries one caller's identity into the next call."""
    token = current_identity.set(identity)
    try:
        yield identity
    finally:
        current_identity.reset(token)

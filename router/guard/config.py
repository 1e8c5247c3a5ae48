"""The `guard:` section of the router config: which links of the guard chain run, and how."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from router.guard.auth_config import AuthConfig
from router.guard.authz import AuthzConfig
from router.guard.guardrails_config import GuardrailsConfig
from router.guard.limits.config import RateLimitConfig
from router.registry.config import RegistryConfig

STANDALONE_KEYS = Path("~/.local/share/irouter/registry.db")
"""The API keys' own SQLite file when neither guard.auth.registry nor the registry is set."""


def keys_location(auth: AuthSection, registry: RegistryConfig) -> Path | str:
    """Where the API keys are: guard.auth.registry, else the registry database's URL (when the
    registry is on), else STANDALONE_KEYS."""
    if auth.registry is not None:
        return auth.registry
    return registry.resolved_url() if registry.enabled else STANDALONE_KEYS.expanduser()


@dataclass(frozen=True)
class MtlsIdentity:
    """What a verified client certificate is allowed to be."""

    tenant: str
    """Tenant the calls are billed and limited to."""
    scopes: frozenset[str] = frozenset()
    """Scopes granted to the certificate."""
    tier: str = "default"
    """Service tier for rate limits."""


@dataclass(frozen=True)
class AuthSection:
    enabled: bool = False
    """Off: every call runs as tenant 'anonymous' with every scope (a laptop, a trusted network)."""
    config: AuthConfig = field(default_factory=AuthConfig)
    """JWT issuers, anonymous access, token cache (router.guard.auth_config.AuthConfig)."""
    api_keys: bool = True
    """Accept API keys made with `irouter keys create`."""
    registry: Path | None = None
    """A SQLite file of its own holding the API keys (hashed). Unset: the keys live in the
    registry database (`registry.url`: its SQLite file, or a cluster's PostgreSQL), or, with the
    registry off, in ~/.local/share/irouter/registry.db."""
    mtls_identities: Mapping[str, MtlsIdentity] = field(default_factory=dict)
    """Client-certificate URI SAN (e.g. spiffe://acme/billing) or subject CN -> identity."""


@dataclass(frozen=True)
class RateLimitSection:
    enabled: bool = False
    """Apply per-tenant request, token and stream limits."""
    config: RateLimitConfig = field(default_factory=RateLimitConfig)
    """Tiers and store (router.guard.limits.config.RateLimitConfig)."""


@dataclass(frozen=True)
class GuardrailsSection:
    enabled: bool = False
    """Check prompts and filter streamed output against the policies."""
    config: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    """Policies (router.guard.guardrails.GuardrailsConfig)."""


@dataclass(frozen=True)
class GuardConfig:
    default_timeout_s: float = 0.0
    """Deadline for calls that come without one; 0 leaves them unbounded."""
    audit_log: str = ""
    """JSON-lines audit log path ('-' for stderr, '' for none)."""
    auth: AuthSection = field(default_factory=AuthSection)
    """Authentication."""
    authz: AuthzConfig = field(default_factory=AuthzConfig)
    """Scopes per method and per-tenant model allowlists (used when auth is enabled)."""
    rate_limit: RateLimitSection = field(default_factory=RateLimitSection)
    """Rate limits and token quotas."""
    guardrails: GuardrailsSection = field(default_factory=GuardrailsSection)
    """Input and output guardrails."""

    @property
    def active(self) -> bool:
        """Whether any link does work; if not, calls run with no guard chain at all."""
        return bool(
            self.auth.enabled
            or self.rate_limit.enabled
            or self.guardrails.enabled
            or self.audit_log
            or self.default_timeout_s
        )

    def validate(self) -> None:
        if self.default_timeout_s < 0:
            raise ValueError(f"guard.default_timeout_s={self.default_timeout_s} must be >= 0")
        if self.auth.enabled:
            self.auth.config.validate()
        if self.rate_limit.enabled:
            self.rate_limit.config.validate()
        if self.guardrails.enabled:
            self.guardrails.config.validate()

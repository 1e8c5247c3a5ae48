"""How callers prove who they are: trusted JWT issuers and the authenticator's limits
(`router.guard.auth` does the checking)."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.guard.jwks import ASYMMETRIC_ALGORITHMS, require_secure_url

DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
_MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted JWT issuer."""

    issuer: str
    """The exact `iss` its tokens carry; also the base URL for OIDC discovery."""
    audience: str | tuple[str, ...]
    """The `aud` value(s) a token must carry to be meant for this router."""
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    """Accepted signing algorithms; with shared_secret the default becomes ('HS256',)."""
    jwks_url: str | None = None
    """Where its keys are; None: read `jwks_uri` from {issuer}/.well-known/openid-configuration."""
    shared_secret: str | None = field(default=None, repr=False)
    """HS256 secret (at least 32 bytes); set only for issuers that sign with HMAC."""
    leeway_s: float = 30.0
    """Clock skew tolerated on exp, nbf and iat, in seconds."""
    tenant_claim: str = "tenant"
    """Claim naming the caller's tenant."""
    scope_claim: str = "scope"
    """Claim holding scopes: a space-separated string (OAuth) or a list of strings."""
    refresh_min_interval_s: float = 30.0
    """Fewest seconds between two JWKS fetches triggered by unknown key ids."""
    default_tenant: str | None = None
    """Tenant for tokens without the tenant claim; None refuses such tokens."""
    tier_claim: str = "tier"
    """Claim naming the caller's service tier; tokens without it get 'default'."""

    def __post_init__(self) -> None:
        if self.shared_secret is not None and self.algorithms == DEFAULT_ALGORITHMS:
            object.__setattr__(self, "algorithms", ("HS256",))

    def validate(self) -> None:
        where = f"issuer {self.issuer!r}"
        if not self.issuer:
            raise ValueError("issuer must not be empty")
        audiences = (self.audience,) if isinstance(self.audience, str) else self.audience
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise ValueError(f"{where}: audience must be a non-empty string or tuple of them")
        if any(alg.lower() == "none" for alg in self.algorithms):
            raise ValueError(f"{where}: algorithm 'none' is never accepted; remove it")
        if self.shared_secret is not None:
            self._check_shared_secret(where)
        else:
            unknown = [alg for alg in self.algorithms if alg not in ASYMMETRIC_ALGORITHMS]
            if not self.algorithms or unknown:
                raise ValueError(
                    f"{where}: algorithms {unknown or '()'} not accepted; use some of "
                    f"{sorted(ASYMMETRIC_ALGORITHMS)} (HS256 only together with shared_secret)"
                )
            if self.jwks_url is not None:
                require_secure_url(self.jwks_url, f"{where}: jwks_url")
            else:
                require_secure_url(self.issuer, f"{where}: issuer (the OIDC discovery base)")
        if self.leeway_s < 0:
            raise ValueError(f"{where}: leeway_s={self.leeway_s} must be >= 0")
        if self.refresh_min_interval_s <= 0:
            raise ValueError(
                f"{where}: refresh_min_interval_s={self.refresh_min_interval_s} must be > 0"
            )
        if not self.tenant_claim or not self.scope_claim or not self.tier_claim:
            raise ValueError(f"{where}: tenant_claim, scope_claim and tier_claim must be set")

    def _check_shared_secret(self, where: str) -> None:
        assert self.shared_secret is not None
        # A secret-keyed issuer accepts HS256 and nothing else, and an HS256 token is never
        # checked against a public key: accepting both is the classic attack where a token is
        # HMAC-signed with the (public) RSA key as the secret.
        if self.algorithms != ("HS256",):
            raise ValueError(
                f"{where}: with shared_secret set, algorithms must be ('HS256',), "
                f"not {self.algorithms}"
            )
        if self.jwks_url is not None:
            raise ValueError(f"{where}: set either shared_secret or jwks_url, not both")
        if len(self.shared_secret.encode()) < _MIN_SECRET_BYTES:
            raise ValueError(
                f"{where}: shared_secret must be at least {_MIN_SECRET_BYTES} bytes for HS256"
            )

    @property
    def audiences(self) -> list[str]:
        return [self.audience] if isinstance(self.audience, str) else list(self.audience)


@dataclass(frozen=True)
class AuthConfig:
    """How callers prove who they are."""

    issuers: tuple[IssuerConfig, ...] = ()
    """Trusted JWT issuers; empty: bearer JWTs are refused."""
    allow_anonymous: bool = False
    """Serve calls without credentials as tenant 'anonymous'."""
    anonymous_scopes: frozenset[str] = frozenset()
    """Scopes of anonymous callers."""
    max_token_bytes: int = 8192
    """Longer tokens are refused before any parsing."""
    token_cache_size: int = 10_000
    """Verified tokens remembered (least recently used dropped first)."""
    http_timeout_s: float = 5.0
    """Timeout of each discovery or JWKS request."""
    jwks_max_age_s: float = 3600.0
    """Age after which an issuer's keys are re-fetched in the background."""

    def validate(self) -> None:
        for issuer in self.issuers:
            issuer.validate()
        names = [issuer.issuer for issuer in self.issuers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"issuers {duplicates} are configured more than once")
        for name in ("max_token_bytes", "token_cache_size", "http_timeout_s", "jwks_max_age_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"auth {name}={getattr(self, name)} must be > 0")

"""Authentication: turn a call's metadata into a verified `Identity`, or refuse it.

Credentials, in the order they are looked for:
- `authorization: Bearer irk_...` or `x-api-key: irk_...`: an API key from the registry;
- `authorization: Bearer <jwt>`: a JWT from a configured issuer, checked with its JWKS (or, for
  an issuer configured with a shared secret, HS256);
- nothing: anonymous, only where `allow_anonymous` is set. A credential that is present but bad
  is refused even then: a caller whose token expired must learn so, not silently lose rights.

Verifying a JWT signature costs 40-54% of the router's throughput when done on every call, so a
verified token is cached (by its SHA-256) until it expires: a repeat call costs one hash, one
dict lookup and one clock read. API keys are checked against the registry on every call (its own
cache is revocation-aware), so that a revoked key stops working at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import httpx
import jwt

from router.errors import Unauthenticated
from router.guard.auth_config import AuthConfig, IssuerConfig
from router.guard.identity import ANONYMOUS_SUBJECT, Identity
from router.guard.jwks import JwksClient, clip
from router.registry.keys import API_KEY_PREFIX, KeyRecord, looks_like_api_key

logger = logging.getLogger(__name__)

_MAX_API_KEY_CHARS = 256

Metadata = Mapping[str, str] | Iterable[tuple[str, str | bytes]]
"""A call's metadata: a mapping, or the (key, value) pairs grpc hands an interceptor."""


class ApiKeyVerifier(Protocol):
    """The registry as the authenticator sees it (`router.registry.KeyStore`)."""

    def verify(self, plaintext: str) -> KeyRecord | None: ...

    async def averify(self, plaintext: str) -> KeyRecord | None: ...


class TokenCache:
    """Verified tokens: sha256(token) -> Identity, until each token's expiry, LRU-bounded.

    Used from the event loop thread only, so it takes no lock. Keys are hashes so the cache
    holds no usable credential and its keys have a fixed size whatever the token length.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Identity | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, identity: Identity, valid_until: float) -> None:
        self._entries[key] = (identity, valid_until)
        self._entries.move_to_end(key)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


# pyjwt's errors, most specific first, mapped to messages that say what was wrong.
_JWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token is not yet valid (its 'nbf' or 'iat' is in the future)"),
    (jwt.InvalidAudienceError, "token audience does not match"),
    (jwt.InvalidIssuerError, "token issuer does not match"),
    (jwt.InvalidIssuedAtError, "token 'iat' claim is not a number"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.InvalidAlgorithmError, "token algorithm is not accepted for its signing key"),
    (jwt.DecodeError, "token is not a well-formed JWT"),
    (jwt.InvalidKeyError, "token signing key is unusable"),
)


def _jwt_error_message(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token is missing the '{exc.claim}' claim"
    for kind, message in _JWT_ERRORS:
        if isinstance(exc, kind):
            return message
    return "token is invalid"


class Authenticator:
    """Verifies the credentials of a call; inject it into the auth link."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        api_keys: ApiKeyVerifier | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()  # cheap, and an auth config must never run unchecked
        self._config = config
        self._api_keys = api_keys
        self._clock = clock
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(config.http_timeout_s))
        self._issuers = {issuer.issuer: issuer for issuer in config.issuers}
        self._jwks = {
            issuer.issuer: JwksClient(
                issuer.issuer,
                http=self._http,
                jwks_url=issuer.jwks_url,
                refresh_min_interval_s=issuer.refresh_min_interval_s,
                max_age_s=config.jwks_max_age_s,
                monotonic=monotonic,
            )
            for issuer in config.issuers
            if issuer.shared_secret is None
        }
        self._tokens = TokenCache(config.token_cache_size)
        # key id -> (record, identity); only keys that verified get here, so it stays as small
        # as the registry's set of live keys.
        self._key_identities: dict[str, tuple[KeyRecord, Identity]] = {}
        self._anonymous = Identity(
            subject=ANONYMOUS_SUBJECT,
            tenant=ANONYMOUS_SUBJECT,
            scopes=config.anonymous_scopes,
            method="anonymous",
        )

    async def start(self) -> None:
        """Fetch every issuer's keys now, so the first calls do not wait for the providers."""
        await asyncio.gather(*(client.prefetch() for client in self._jwks.values()))

    async def aclose(self) -> None:
        for client in self._jwks.values():
            client.close()
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Authenticator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def authenticate(self, metadata: Metadata) -> Identity:
        """The caller's identity; raises Unauthenticated naming what is missing or wrong (and
        Unavailable when an issuer's keys cannot be fetched at all)."""
        authorization, api_key = _credentials(metadata)
        if authorization is not None and api_key is not None:
            raise Unauthenticated("send one credential: 'authorization' or 'x-api-key', not both")
        if api_key is not None:
            return await self.authenticate_api_key(api_key.strip())
        if authorization is not None:
            scheme, _, credential = authorization.strip().partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential:
                raise Unauthenticated("the 'authorization' header must read 'Bearer <token>'")
            if credential.startswith(API_KEY_PREFIX):
                return await self.authenticate_api_key(credential)
            return await self.authenticate_token(credential)
        if self._config.allow_anonymous:
            return self._anonymous
        raise Unauthenticated(
            "missing credentials: send 'authorization: Bearer <token>' or 'x-api-key'"
        )

    async def authenticate_api_key(self, key: str) -> Identity:
        if self._api_keys is None:
            raise Unauthenticated("API keys are not accepted by this router")
        record = await self._api_keys.averify(key) if len(key) <= _MAX_API_KEY_CHARS else None
        if record is None:
            if not looks_like_api_key(key):
                raise Unauthenticated(
                    f"API key is malformed: expected '{API_KEY_PREFIX}<id>_<secret>'"
                )
            raise Unauthenticated("unknown API key or revoked")
        # The registry hands back the same record object while its cache holds the key, so the
        # identity built for it can be reused (a frozen dataclass costs ~1.5 us to build).
        known = self._key_identities.get(record.key_id)
        if known is not None and known[0] is record:
            return known[1]
        identity = Identity(
            subject=f"api-key:{record.key_id}",
            tenant=record.tenant,
            scopes=record.scopes,
            method="api_key",
            key_id=record.key_id,
            tier=record.tier,
        )
        self._key_identities[record.key_id] = (record, identity)
        return identity

    async def authenticate_token(self, token: str) -> Identity:
        if len(token) > self._config.max_token_bytes:
            raise Unauthenticated(
                f"token is {len(token)} bytes, over the {self._config.max_token_bytes}-byte limit"
            )
        if not token.isascii():
            raise Unauthenticated("token is not a well-formed JWT")
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        identity = self._tokens.get(digest, now)
        if identity is not None:
            return identity
        identity, valid_until = await self._verify(token)
        if valid_until > now:
            self._tokens.put(digest, identity, valid_until)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, float]:
        if not self._issuers:
            raise Unauthenticated("bearer tokens are not accepted: no JWT issuer is configured")
        try:
            header = jwt.get_unverified_header(token)
            issuer = self._issuer_of(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthenticated("token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in issuer.algorithms:
            raise Unauthenticated(
                f"token algorithm {clip(algorithm, 24)} is not accepted for issuer "
                f"'{issuer.issuer}' (accepted: {', '.join(issuer.algorithms)})"
            )
        kid = header.get("kid")
        key: jwt.PyJWK | bytes
        if issuer.shared_secret is not None:
            key = issuer.shared_secret.encode()
        else:
            key = await self._jwks[issuer.issuer].get_key(kid, algorithm)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=issuer.audiences,
                issuer=issuer.issuer,
                leeway=issuer.leeway_s,
                options={"require": ["exp", "iss", "sub"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(_jwt_error_message(exc)) from None
        except Exception as exc:  # a crafted token must never turn into an INTERNAL error
            logger.warning("token verification failed unexpectedly: %s", type(exc).__name__)
            raise Unauthenticated("token could not be verified") from None
        identity = _identity_from_claims(claims, issuer, kid if isinstance(kid, str) else None)
        assert identity.expires_at is not None  # 'exp' is required above
        return identity, identity.expires_at + issuer.leeway_s

    def _issuer_of(self, token: str) -> IssuerConfig:
        if len(self._issuers) == 1:
            # pyjwt checks `iss` against it during verification.
            return next(iter(self._issuers.values()))
        # Several issuers: pick the configuration by the (not yet verified) `iss`; verification
        # then checks the signature with that issuer's keys only.
        unverified = jwt.decode(token, options={"verify_signature": False})
        name = unverified.get("iss")
        issuer = self._issuers.get(name) if isinstance(name, str) else None
        if issuer is None:
            raise Unauthenticated(f"token issuer {clip(name)} is not trusted")
        return issuer


def _credentials(metadata: Metadata) -> tuple[str | None, str | None]:
    """(authorization, x-api-key) from the metadata; refuses repeated or binary values."""
    items: Iterable[tuple[str, str | bytes]] = (
        metadata.items() if isinstance(metadata, Mapping) else metadata
    )
    found: dict[str, str] = {}
    for key, value in items:
        name = key.lower()
        if name not in ("authorization", "x-api-key"):
            continue
        if name in found:
            raise Unauthenticated(f"send '{name}' once, not several times")
        if not isinstance(value, str):
            raise Unauthenticated(f"'{name}' must be text")
        found[name] = value
    return found.get("authorization"), found.get("x-api-key")


def _identity_from_claims(
    claims: dict[str, Any], issuer: IssuerConfig, kid: str | None
) -> Identity:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token 'sub' claim must be a non-empty string")
    tenant = claims.get(issuer.tenant_claim, issuer.default_tenant)
    if tenant is None:
        raise Unauthenticated(f"token has no '{issuer.tenant_claim}' claim naming the tenant")
    if not isinstance(tenant, str) or not tenant:
        raise Unauthenticated(f"token '{issuer.tenant_claim}' claim must be a non-empty string")
    raw_scopes = claims.get(issuer.scope_claim)
    if raw_scopes is None:
        scopes: frozenset[str] = frozenset()
    elif isinstance(raw_scopes, str):
        scopes = frozenset(raw_scopes.split())
    elif isinstance(raw_scopes, list) and all(isinstance(s, str) for s in raw_scopes):
        scopes = frozenset(raw_scopes)
    else:
        raise Unauthenticated(
            f"token '{issuer.scope_claim}' claim must be a space-separated string or a list "
            "of strings"
        )
    tier = claims.get(issuer.tier_claim)
    try:
        expires_at = float(claims["exp"])
    except (TypeError, ValueError, OverflowError):
        raise Unauthenticated("token 'exp' claim is not a number") from None
    return Identity(
        subject=subject,
        tenant=tenant,
        scopes=scopes,
        method="jwt",
        key_id=kid,
        tier=tier if isinstance(tier, str) and tier else "default",
        expires_at=expires_at,
    )

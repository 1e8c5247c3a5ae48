"""The signing keys of one JWT issuer: OIDC discovery, JWKS fetch, and a cache that follows key
rotation without a restart.

Keys are fetched once and served from memory. A token whose `kid` is not in the cache triggers a
re-fetch (the provider has rotated in a new key), but at most one fetch per
`refresh_min_interval_s`: a flood of tokens with made-up kids must cost the provider nothing, so
extra misses inside the interval are answered from the cache, and misses that arrive while a fetch
is in flight wait for that same fetch. A cache older than `max_age_s` is refreshed in the
background so keys the provider withdrew stop verifying without anyone having to restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from router.errors import Unauthenticated, Unavailable

logger = logging.getLogger(__name__)

# JWK key type (and curve) each asymmetric algorithm needs. Checking it before building the key
# means a header cannot pair an algorithm with a key of another kind. HMAC is absent on purpose:
# a shared secret never comes from a public JWKS.
_KEY_KINDS: dict[str, tuple[str, frozenset[str] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
ASYMMETRIC_ALGORITHMS = frozenset(_KEY_KINDS)

_MAX_DOCUMENT_BYTES = 1 << 20
# A failed fetch (provider down at start-up) is retried sooner than the normal refresh interval,
# so a short outage of the provider does not lock callers out for the whole interval.
_FAILED_FETCH_RETRY_S = 5.0


class JwksFetchError(Exception):
    """The discovery document or the JWKS could not be fetched or did not make sense."""


def require_secure_url(url: str, what: str) -> None:
    """Raise ValueError unless `url` is https, or http to a loopback host (local providers and
    tests). Keys fetched over plain http from elsewhere could be swapped by anyone on the path."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValueError(
        f"{what} {url!r} must be an https:// URL (http:// is accepted for localhost only)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def clip(value: object, limit: int = 64) -> str:
    """An attacker-supplied value, shortened and quoted, fit for an error message or a log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JwksClient:
    """Signing keys of one issuer, fetched over HTTP and cached."""

    def __init__(
        self,
        issuer: str,
        *,
        http: httpx.AsyncClient,
        jwks_url: str | None = None,
        refresh_min_interval_s: float = 30.0,
        max_age_s: float = 3600.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self._http = http
        self._configured_url = jwks_url
        self._discovered_url: str | None = None
        self._refresh_min_interval_s = refresh_min_interval_s
        self._max_age_s = max_age_s
        self._monotonic = monotonic
        self._keys: dict[str, dict[str, Any]] | None = None  # kid -> JWK; None: never loaded
        self._unnamed: list[dict[str, Any]] = []  # JWKs published without a kid
        self._built: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._last_failed = False
        self._last_error = ""
        self._inflight: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    def close(self) -> None:
        """Cancel a fetch in flight (at shutdown), so no task outlives the HTTP client."""
        if self._inflight is not None:
            self._inflight.cancel()

    async def prefetch(self) -> None:
        """Load the keys now (at start-up) so the first call does not wait for the provider.
        Failures are logged, not raised: the provider may come up after the router."""
        await self._fetch_once()

    async def get_key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key that verifies a token signed with `algorithm` under `kid`.

        Raises Unauthenticated when the issuer does not publish such a key (after one rate-limited
        re-fetch) and Unavailable when the keys could never be fetched at all.
        """
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("token header 'kid' must be a string")
        jwk = self._lookup(kid)
        if jwk is None:
            await self._fetch_once()
            jwk = self._lookup(kid)
        elif self._stale():
            self._start_fetch()  # serve the cached key now; the refresh lands for later calls
        if jwk is None:
            if self._keys is None:
                raise Unavailable(
                    f"cannot fetch the signing keys of issuer '{self.issuer}': {self._last_error}"
                )
            if kid is None:
                raise Unauthenticated(
                    f"token header has no 'kid' and issuer '{self.issuer}' publishes "
                    f"{len(self._keys) + len(self._unnamed)} keys"
                )
            raise Unauthenticated(
                f"token signing key {clip(kid)} is not published by issuer '{self.issuer}'"
            )
        return self._build(kid, algorithm, jwk)

    def _lookup(self, kid: str | None) -> dict[str, Any] | None:
        if self._keys is None:
            return None
        if kid is not None:
            return self._keys.get(kid)
        # Without a kid the key is unambiguous only when the issuer publishes exactly one.
        everything = [*self._keys.values(), *self._unnamed]
        return everything[0] if len(everything) == 1 else None

    def _build(self, kid: str | None, algorithm: str, jwk: dict[str, Any]) -> jwt.PyJWK:
        built = self._built.get((kid, algorithm))
        if built is not None:
            return built
        kind = _KEY_KINDS.get(algorithm)
        if kind is None:
            raise Unauthenticated(f"token algorithm {clip(algorithm)} cannot use a published key")
        kty, curves = kind
        if jwk.get("kty") != kty or (curves is not None and jwk.get("crv") not in curves):
            raise Unauthenticated(
                f"token algorithm {algorithm} does not match the type of signing key {clip(kid)}"
            )
        published_alg = jwk.get("alg")
        if published_alg is not None and published_alg != algorithm:
            raise Unauthenticated(
                f"token algorithm {algorithm} differs from the algorithm {clip(published_alg)} "
                f"issuer '{self.issuer}' publishes for key {clip(kid)}"
            )
        try:
            built = jwt.PyJWK(jwk, algorithm=algorithm)
        except jwt.PyJWTError as exc:
            logger.warning(
                "issuer %s publishes an unusable key %s: %s", self.issuer, clip(kid), exc
            )
            raise Unauthenticated(
                f"signing key {clip(kid)} of issuer '{self.issuer}' is unusable"
            ) from None
        self._built[(kid, algorithm)] = built
        return built

    def _stale(self) -> bool:
        return (
            self._loaded_at is not None
            and self._inflight is None
            and self._monotonic() - self._loaded_at > self._max_age_s
        )

    async def _fetch_once(self) -> None:
        """Fetch unless a fetch ran too recently; join the fetch in flight if there is one."""
        if self._inflight is None:
            now = self._monotonic()
            if self._last_attempt is not None:
                interval = self._refresh_min_interval_s
                if self._last_failed:
                    interval = min(interval, _FAILED_FETCH_RETRY_S)
                if now - self._last_attempt < interval:
                    return
            self._start_fetch()
        assert self._inflight is not None
        # shield: a caller that is cancelled (its deadline passed) must not cancel the fetch the
        # other waiters share.
        await asyncio.shield(self._inflight)

    def _start_fetch(self) -> None:
        self._last_attempt = self._monotonic()
        task = asyncio.get_running_loop().create_task(self._fetch())
        self._inflight = task
        task.add_done_callback(self._fetch_done)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self) -> None:
        try:
            url = await self._jwks_url()
            document = await self._get_json(url)
            keys, unnamed = _parse_jwks(document)
        # Any failure (HTTP, a bad document, a bad URL) must reach the waiting calls as "no key
        # yet", never as an exception that would turn their calls into INTERNAL errors.
        except Exception as exc:
            self._last_failed = True
            self._last_error = str(exc) or type(exc).__name__
            # The provider may have moved its JWKS; discover again next time.
            self._discovered_url = None
            logger.warning("fetching the JWKS of issuer %s failed: %s", self.issuer, exc)
            return
        old = set(self._keys or ())
        self._keys, self._unnamed = keys, unnamed
        self._built = {}
        self._loaded_at = self._monotonic()
        self._last_failed = False
        self._last_error = ""
        logger.info(
            "loaded %d signing keys of issuer %s (added %s, removed %s)",
            len(keys) + len(unnamed),
            self.issuer,
            sorted(set(keys) - old) or "none",
            sorted(old - set(keys)) or "none",
        )

    async def _jwks_url(self) -> str:
        if self._configured_url is not None:
            return self._configured_url
        if self._discovered_url is not None:
            return self._discovered_url
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url)
        # OIDC Discovery 1.0 §4.3: the document must name the issuer it was fetched for, or a
        # provider could hand out keys for someone else's tokens.
        if document.get("issuer") != self.issuer:
            raise JwksFetchError(
                f"discovery document at {url} names issuer {clip(document.get('issuer'))}, "
                f"not '{self.issuer}'"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise JwksFetchError(f"discovery document at {url} has no 'jwks_uri'")
        try:
            require_secure_url(jwks_uri, "discovered jwks_uri")
        except ValueError as exc:
            raise JwksFetchError(str(exc)) from None
        self._discovered_url = jwks_uri
        return jwks_uri

    async def _get_json(self, url: str) -> dict[str, Any]:
        response = await self._http.get(url, headers={"accept": "application/json"})
        response.raise_for_status()
        if len(response.content) > _MAX_DOCUMENT_BYTES:
            raise JwksFetchError(f"{url} returned {len(response.content)} bytes, over 1 MiB")
        try:
            document = response.json()
        except ValueError as exc:
            raise JwksFetchError(f"{url} did not return JSON: {exc}") from None
        if not isinstance(document, dict):
            raise JwksFetchError(f"{url} returned JSON that is not an object")
        return document


def _parse_jwks(document: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise JwksFetchError("the JWKS has no 'keys' list")
    keys: dict[str, dict[str, Any]] = {}
    unnamed: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kty"), str):
            continue
        # Encryption keys share JWKS documents with signing keys; they must not verify tokens.
        if entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if isinstance(kid, str):
            keys[kid] = entry
        elif kid is None:
            unnamed.append(entry)
    if not keys and not unnamed:
        raise JwksFetchError("the JWKS holds no signing keys")
    return keys, unnamed

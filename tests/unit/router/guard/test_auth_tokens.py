"""JWT authentication against a real local OIDC provider: discovery, JWKS, rotation, the refresh
rate limit, the verified-token cache, and the attacks a token check must refuse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from oidc_provider import (
    AUDIENCE,
    OidcProvider,
    Signer,
    b64,
    claims,
    ec_signer,
    ed_signer,
    forge,
    rsa_signer,
)

from router.errors import Unauthenticated, Unavailable
from router.guard.auth import Authenticator, TokenCache
from router.guard.auth_config import AuthConfig, IssuerConfig
from router.guard.identity import Identity

SECRET = "s" * 40


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider() -> Iterator[OidcProvider]:
    served = OidcProvider()
    yield served
    served.close()


def make_auth(
    provider: OidcProvider,
    *,
    monotonic: FakeClock | None = None,
    clock: Callable[[], float] = time.time,
    **issuer: Any,
) -> Authenticator:
    config = AuthConfig(issuers=(IssuerConfig(provider.issuer, AUDIENCE, **issuer),))
    return Authenticator(config, monotonic=monotonic or FakeClock(1000.0), clock=clock)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("make_signer", [rsa_signer, ec_signer, ed_signer])
async def test_tokens_of_each_key_type_verify_through_discovery(
    provider: OidcProvider, make_signer: Callable[[str], Signer]
) -> None:
    signer = make_signer("k1")
    provider.publish(signer)
    token = signer.sign(claims(provider.issuer, tier="premium"))
    async with make_auth(provider) as auth:
        identity = await auth.authenticate(bearer(token))
    assert identity == Identity(
        subject="user-1",
        tenant="acme",
        scopes=frozenset({"generate", "embed"}),
        method="jwt",
        key_id="k1",
        tier="premium",
        expires_at=float(jwt.decode(token, options={"verify_signature": False})["exp"]),
    )
    assert provider.hits["/.well-known/openid-configuration"] == 1
    assert provider.jwks_hits == 1


async def test_scopes_as_a_list_and_grpc_metadata_pairs(provider: OidcProvider) -> None:
    signer = rsa_signer("k1")
    provider.publish(signer)
    token = signer.sign(claims(provider.issuer, scope=["generate", "admin"]))
    async with make_auth(provider) as auth:
        identity = await auth.authenticate(
            [("x-request-id", "r1"), ("authorization", f"Bearer {token}")]
        )
    assert identity.scopes == {"generate", "admin"}


async def test_rotated_in_key_is_accepted_once_the_refresh_interval_allows(
    provider: OidcProvider,
) -> None:
    old, new = rsa_signer("old"), ec_signer("new")
    provider.publish(old)
    monotonic = FakeClock(1000.0)
    async with make_auth(provider, monotonic=monotonic, refresh_min_interval_s=30) as auth:
        await auth.authenticate(bearer(old.sign(claims(provider.issuer))))
        provider.publish(old, new)
        new_token = new.sign(claims(provider.issuer))
        # Keys were fetched a moment ago: the unknown kid may not trigger another fetch yet.
        with pytest.raises(Unauthenticated, match="not published by issuer"):
            await auth.authenticate(bearer(new_token))
        assert provider.jwks_hits == 1
        monotonic.now += 31
        identity = await auth.authenticate(bearer(new_token))
        assert identity.key_id == "new"
        assert provider.jwks_hits == 2
        # The old key still verifies while it is published.
        await auth.authenticate(bearer(old.sign(claims(provider.issuer, sub="user-2"))))


async def test_withdrawn_key_stops_verifying_after_the_background_refresh(
    provider: OidcProvider,
) -> None:
    old, new = rsa_signer("old"), ec_signer("new")
    provider.publish(old, new)
    monotonic = FakeClock(1000.0)
    config = AuthConfig(issuers=(IssuerConfig(provider.issuer, AUDIENCE),), jwks_max_age_s=600)
    async with Authenticator(config, monotonic=monotonic) as auth:
        await auth.authenticate(bearer(old.sign(claims(provider.issuer))))
        provider.publish(new)
        monotonic.now += 601
        # Stale keys still answer this call; the refresh runs behind it.
        await auth.authenticate(bearer(old.sign(claims(provider.issuer, sub="user-2"))))
        for _ in range(100):
            if provider.jwks_hits == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        with pytest.raises(Unauthenticated, match="not published"):
            await auth.authenticate(bearer(old.sign(claims(provider.issuer, sub="user-3"))))


async def test_a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval(
    provider: OidcProvider,
) -> None:
    known, attacker = rsa_signer("known"), ec_signer("attacker")
    provider.publish(known)
    monotonic = FakeClock(1000.0)
    async with make_auth(provider, monotonic=monotonic, refresh_min_interval_s=30) as auth:
        await auth.authenticate(bearer(known.sign(claims(provider.issuer))))
        assert provider.jwks_hits == 1
        provider.delay_s = 0.05  # so the misses below overlap one in-flight fetch

        async def flood() -> list[BaseException | Identity]:
            tokens = [
                attacker.sign(claims(provider.issuer, sub=f"u{i}"), kid=f"made-up-{i}")
                for i in range(200)
            ]
            return await asyncio.gather(
                *(auth.authenticate(bearer(t)) for t in tokens), return_exceptions=True
            )

        results = await flood()
        assert all(isinstance(r, Unauthenticated) for r in results)
        assert provider.jwks_hits == 1  # inside the interval: no fetch at all
        monotonic.now += 31
        results = await flood()
        assert all(isinstance(r, Unauthenticated) for r in results)
        assert provider.jwks_hits == 2  # 200 concurrent misses shared one fetch
        # Known tokens keep working throughout.
        await auth.authenticate(bearer(known.sign(claims(provider.issuer, sub="after"))))


async def test_concurrent_first_calls_share_one_discovery_and_one_fetch(
    provider: OidcProvider,
) -> None:
    signer = ed_signer("k1")
    provider.publish(signer)
    provider.delay_s = 0.05
    tokens = [signer.sign(claims(provider.issuer, sub=f"u{i}")) for i in range(50)]
    async with make_auth(provider) as auth:
        identities = await asyncio.gather(*(auth.authenticate(bearer(t)) for t in tokens))
    assert {i.subject for i in identities} == {f"u{i}" for i in range(50)}
    assert provider.hits["/.well-known/openid-configuration"] == 1
    assert provider.jwks_hits == 1


async def test_unreachable_provider_is_unavailable_not_unauthenticated(
    provider: OidcProvider,
) -> None:
    signer = rsa_signer("k1")
    token = signer.sign(claims(provider.issuer))
    provider.close()
    provider.close = lambda: None  # type: ignore[method-assign]
    async with make_auth(provider) as auth:
        with pytest.raises(Unavailable, match="cannot fetch the signing keys"):
            await auth.authenticate(bearer(token))


async def test_second_verification_is_served_from_the_cache_until_the_token_expires(
    provider: OidcProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = ec_signer("k1")
    provider.publish(signer)
    calls = {"decode": 0, "header": 0}
    real_decode, real_header = jwt.decode, jwt.get_unverified_header

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        calls["decode"] += 1
        return real_decode(*args, **kwargs)

    def counting_header(*args: Any, **kwargs: Any) -> Any:
        calls["header"] += 1
        return real_header(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    monkeypatch.setattr(jwt, "get_unverified_header", counting_header)
    now = time.time()
    clock = FakeClock(now)
    token = signer.sign(claims(provider.issuer, exp=int(now) + 60))
    async with make_auth(provider, clock=clock, leeway_s=0) as auth:
        first = await auth.authenticate(bearer(token))
        assert calls == {"decode": 1, "header": 1}
        for _ in range(3):
            assert await auth.authenticate(bearer(token)) is first
        assert calls == {"decode": 1, "header": 1}
        clock.now = now + 61
        await auth.authenticate(bearer(token))  # pyjwt's own clock still accepts it
        assert calls == {"decode": 2, "header": 2}


def test_token_cache_drops_the_least_recently_used_entry() -> None:
    cache = TokenCache(2)
    who = Identity("s", "t", frozenset(), "jwt")
    cache.put(b"a", who, 100.0)
    cache.put(b"b", who, 100.0)
    assert cache.get(b"a", 0.0) is who
    cache.put(b"c", who, 100.0)
    assert cache.get(b"b", 0.0) is None
    assert cache.get(b"a", 0.0) is who
    assert cache.get(b"a", 100.0) is None  # expired
    assert len(cache) == 1


def _attacks(provider: OidcProvider, rsa: Signer, other: Signer) -> dict[str, tuple[str, str]]:
    """name -> (token, what the error must say)."""
    iss = provider.issuer
    now = int(time.time())
    valid = rsa.sign(claims(iss))
    head, _, signature = valid.split(".")
    return {
        "alg none": (
            forge({"alg": "none", "typ": "JWT", "kid": rsa.kid}, claims(iss), None),
            "algorithm 'none' is not accepted",
        ),
        "HS256 signed with the RSA public key": (
            forge({"alg": "HS256", "typ": "JWT", "kid": rsa.kid}, claims(iss), rsa.public_pem()),
            "algorithm 'HS256' is not accepted",
        ),
        "expired": (rsa.sign(claims(iss, exp=now - 3600)), "token expired"),
        "not yet valid": (rsa.sign(claims(iss, nbf=now + 3600)), "not yet valid"),
        "wrong audience": (rsa.sign(claims(iss, aud="someone-else")), "audience does not match"),
        "wrong issuer": (rsa.sign(claims("https://evil.example")), "issuer does not match"),
        "payload not JSON": (
            f"{head}.{b64(str(claims(iss, sub='admin')).encode())}.{signature}",
            "signature is invalid",
        ),
        "unknown kid": (other.sign(claims(iss), kid="nobody"), "not published by issuer"),
        "ES256 header on an RSA key": (
            other.sign(claims(iss), kid=rsa.kid),
            "does not match the type of signing key",
        ),
        "garbage": ("\x00\x01garbage", "not a well-formed JWT"),
        "three dots of garbage": ("a.b.c", "not a well-formed JWT"),
        "empty segments": ("..", "not a well-formed JWT"),
        "non-ascii": ("eyJ.é.x", "not a well-formed JWT"),
        "oversized header": (rsa.sign(claims(iss), pad="x" * 9000), "over the 8192-byte limit"),
        "missing exp": (rsa.sign(claims(iss, exp=None)), "missing the 'exp' claim"),
        "missing sub": (rsa.sign(claims(iss, sub=None)), "missing the 'sub' claim"),
        "missing tenant": (rsa.sign(claims(iss, tenant=None)), "no 'tenant' claim"),
        "bad scope claim": (rsa.sign(claims(iss, scope={"a": 1})), "'scope' claim must be"),
        "kid not a string": (
            forge({"alg": "RS256", "kid": 7}, claims(iss), b"x"),
            "not a well-formed JWT",
        ),
    }


async def test_attacks_are_refused_naming_the_problem_without_echoing_the_token(
    provider: OidcProvider,
) -> None:
    rsa, other = rsa_signer("rsa"), ec_signer("ec")
    provider.publish(rsa)
    async with make_auth(provider) as auth:
        for name, (token, message) in _attacks(provider, rsa, other).items():
            with pytest.raises(Unauthenticated, match=message) as caught:
                await auth.authenticate(bearer(token))
            assert token not in str(caught.value), name
        # Nothing above broke the authenticator.
        assert (await auth.authenticate(bearer(rsa.sign(claims(provider.issuer))))).tenant == "acme"
        # Refused tokens are never cached, and the refresh limit held through all of it.
        assert provider.jwks_hits == 1


async def test_tampered_payload_is_refused(provider: OidcProvider) -> None:
    signer = rsa_signer("k1")
    provider.publish(signer)
    head, body, sig = signer.sign(claims(provider.issuer)).split(".")
    forged_body = b64(jwt.utils.base64url_decode(body).replace(b"user-1", b"admin1"))
    async with make_auth(provider) as auth:
        with pytest.raises(Unauthenticated, match="signature is invalid"):
            await auth.authenticate(bearer(f"{head}.{forged_body}.{sig}"))


async def test_issuers_are_told_apart_and_hs256_stays_with_the_secret_issuer(
    provider: OidcProvider,
) -> None:
    rsa = rsa_signer("rsa")
    provider.publish(rsa)
    hs_issuer = "internal-service"
    config = AuthConfig(
        issuers=(
            IssuerConfig(provider.issuer, AUDIENCE),
            IssuerConfig(hs_issuer, (AUDIENCE, "other"), shared_secret=SECRET),
        )
    )
    hs_token = jwt.encode(claims(hs_issuer), SECRET, algorithm="HS256")
    async with Authenticator(config, monotonic=FakeClock(0.0)) as auth:
        assert (await auth.authenticate(bearer(hs_token))).subject == "user-1"
        assert (await auth.authenticate(bearer(rsa.sign(claims(provider.issuer))))).method == "jwt"
        # A secret-signed token claiming the JWKS issuer, and the reverse.
        cross = jwt.encode(claims(provider.issuer), SECRET, algorithm="HS256")
        with pytest.raises(Unauthenticated, match="algorithm 'HS256' is not accepted"):
            await auth.authenticate(bearer(cross))
        with pytest.raises(Unauthenticated, match="algorithm 'RS256' is not accepted"):
            await auth.authenticate(bearer(rsa.sign(claims(hs_issuer))))
        with pytest.raises(Unauthenticated, match="is not trusted"):
            await auth.authenticate(bearer(rsa.sign(claims("https://unknown.example"))))
        wrong_secret = jwt.encode(claims(hs_issuer), "t" * 40, algorithm="HS256")
        with pytest.raises(Unauthenticated, match="signature is invalid"):
            await auth.authenticate(bearer(wrong_secret))

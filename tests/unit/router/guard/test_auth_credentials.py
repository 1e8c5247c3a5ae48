"""Which credential a call carries (metadata parsing, anonymous access, API keys through the
authenticator) and the issuer configuration checks made at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.errors import Unauthenticated
from router.guard.auth import Authenticator
from router.guard.auth_config import AuthConfig, IssuerConfig
from router.guard.identity import Identity
from router.registry.keys import KeyStore

SECRET = "s" * 40


async def test_missing_credentials_name_what_to_send() -> None:
    async with Authenticator(AuthConfig()) as auth:
        with pytest.raises(Unauthenticated, match="missing credentials: send 'authorization"):
            await auth.authenticate({"x-request-id": "r1"})


async def test_anonymous_only_when_configured_and_never_instead_of_a_bad_credential() -> None:
    config = AuthConfig(allow_anonymous=True, anonymous_scopes=frozenset({"models.list"}))
    async with Authenticator(config) as auth:
        identity = await auth.authenticate([])
        assert identity == Identity(
            "anonymous", "anonymous", frozenset({"models.list"}), "anonymous"
        )
        with pytest.raises(Unauthenticated, match="no JWT issuer is configured"):
            await auth.authenticate({"authorization": "Bearer eyJhbGciOi.x.y"})


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"authorization": "Basic dXNlcjpwdw=="}, "must read 'Bearer <token>'"),
        ({"authorization": "Bearer   "}, "must read 'Bearer <token>'"),
        ({"authorization": "Bearer a", "x-api-key": "irk_x"}, "not both"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "once"),
        ([("x-api-key", b"irk_")], "must be text"),
        ({"x-api-key": "sk-not-ours"}, "API key is malformed"),
        ({"x-api-key": "irk_" + "a" * 400}, "API key is malformed"),
    ],
)
async def test_malformed_credentials_are_refused(
    metadata: dict[str, str] | list[tuple[str, str | bytes]], message: str, tmp_path: Path
) -> None:
    store = KeyStore(tmp_path / "keys.db")
    async with Authenticator(AuthConfig(allow_anonymous=True), api_keys=store) as auth:
        with pytest.raises(Unauthenticated, match=message):
            await auth.authenticate(metadata)
    store.close()


async def test_api_keys_in_either_header_and_revocation_from_another_connection(
    tmp_path: Path,
) -> None:
    store = KeyStore(tmp_path / "keys.db")
    key_id, key = store.create("acme", ["generate"], tier="premium", name="ci")
    async with Authenticator(AuthConfig(), api_keys=store) as auth:
        expected = Identity(
            subject=f"api-key:{key_id}",
            tenant="acme",
            scopes=frozenset({"generate"}),
            method="api_key",
            key_id=key_id,
            tier="premium",
        )
        assert await auth.authenticate({"x-api-key": key}) == expected
        assert await auth.authenticate({"authorization": f"Bearer {key}"}) == expected
        cli = KeyStore(tmp_path / "keys.db")
        cli.revoke(key_id)
        cli.close()
        with pytest.raises(Unauthenticated, match="unknown API key or revoked") as caught:
            await auth.authenticate({"x-api-key": key})
        assert key not in str(caught.value)
        forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        with pytest.raises(Unauthenticated, match="unknown API key or revoked"):
            await auth.authenticate({"x-api-key": forged})
    store.close()


async def test_api_keys_refused_when_no_registry_is_configured() -> None:
    async with Authenticator(AuthConfig()) as auth:
        with pytest.raises(Unauthenticated, match="API keys are not accepted"):
            await auth.authenticate({"x-api-key": "irk_0123456789abcdef_" + "a" * 43})


def test_shared_secret_issuer_accepts_hs256_only() -> None:
    issuer = IssuerConfig("svc", "irouter", shared_secret=SECRET)
    assert issuer.algorithms == ("HS256",)
    assert SECRET not in repr(issuer)
    with pytest.raises(ValueError, match=r"algorithms must be \('HS256',\)"):
        IssuerConfig(
            "svc", "irouter", algorithms=("HS256", "RS256"), shared_secret=SECRET
        ).validate()
    with pytest.raises(ValueError, match="at least 32 bytes"):
        IssuerConfig("svc", "irouter", shared_secret="short").validate()
    with pytest.raises(ValueError, match="not both"):
        IssuerConfig("svc", "irouter", shared_secret=SECRET, jwks_url="https://x/jwks").validate()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithms": ("HS256",)}, "HS256 only together with shared_secret"),
        ({"algorithms": ("RS256", "HS256")}, "HS256 only together with shared_secret"),
        ({"algorithms": ("none",)}, "'none' is never accepted"),
        ({"algorithms": ("NONE", "RS256")}, "'none' is never accepted"),
        ({"algorithms": ()}, "not accepted"),
        ({"audience": ()}, "audience must be"),
        ({"audience": ""}, "audience must be"),
        ({"leeway_s": -1}, "leeway_s=-1"),
        ({"refresh_min_interval_s": 0}, "refresh_min_interval_s=0"),
        ({"jwks_url": "http://keys.example/jwks"}, "must be an https:// URL"),
    ],
)
def test_issuer_configuration_errors_name_the_fix(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"issuer": "https://idp.example", "audience": "irouter"}
    with pytest.raises(ValueError, match=message):
        IssuerConfig(**{**base, **kwargs}).validate()  # type: ignore[arg-type]


def test_discovery_needs_a_secure_issuer_url_and_issuers_are_unique() -> None:
    with pytest.raises(ValueError, match="OIDC discovery base"):
        IssuerConfig("http://idp.example", "irouter").validate()
    IssuerConfig("http://localhost:8080", "irouter").validate()  # local providers may use http
    issuer = IssuerConfig("https://idp.example", "irouter")
    with pytest.raises(ValueError, match="more than once"):
        AuthConfig(issuers=(issuer, issuer)).validate()
    with pytest.raises(ValueError, match="more than once"):  # checked before any use
        Authenticator(AuthConfig(issuers=(issuer, issuer)))

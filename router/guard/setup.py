"""Assemble the guard chain from the `guard:` config: the links, and the resources they own
(authenticator, API-key registry, rate limiter) with their start and close."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from prometheus_client import Gauge

from router.errors import Unauthenticated
from router.guard.auth import Authenticator
from router.guard.authz import AuthzConfig, check_method, check_model, check_scope, is_public
from router.guard.chain import CallScope, GuardChain, Link, RequestContextLink
from router.guard.config import GuardConfig, MtlsIdentity, keys_location
from router.guard.guardrails import (
    FilterResult,
    Finding,
    GuardrailViolation,
    InputGuard,
    OutputGuard,
)
from router.guard.identity import Identity
from router.guard.limits.limiter import RateLimiter, Reservation
from router.registry.config import RegistryConfig
from router.registry.keys import KeyStore, open_key_store
from router.telemetry import CallRecorder, Metrics

logger = logging.getLogger(__name__)

# Calls whose token use the service knows (it reserves prompt + max_tokens through
# CallScope.admit); every other method is charged one request and no tokens up front.
TOKEN_METHODS = frozenset(
    {
        "/irouter.v1.InferenceService/Generate",
        "/irouter.v1.InferenceService/Complete",
        "/irouter.v1.InferenceService/Embed",
    }
)

TRUSTED = Identity(
    subject="anonymous", tenant="anonymous", scopes=frozenset({"admin"}), method="anonymous"
)


class TrustedLink:
    """Auth disabled: every call is the anonymous tenant with every scope."""

    name = "auth-off"

    async def before(self, scope: CallScope) -> None:
        scope.identity = TRUSTED


class AuthLink:
    """A verified client certificate that maps to an identity wins; otherwise the bearer token
    or API key in the metadata."""

    name = "auth"

    def __init__(self, authenticator: Authenticator, mtls: Mapping[str, MtlsIdentity]) -> None:
        self._auth = authenticator
        self._mtls = mtls

    async def before(self, scope: CallScope) -> None:
        if self._mtls and scope.context is not None:
            identity = mtls_identity(scope.context.auth_context(), self._mtls)
            if identity is not None:
                scope.identity = identity
                return
        scope.identity = await self._auth.authenticate(scope.metadata)


def mtls_identity(
    auth_context: Mapping[str, Iterable[bytes]], mapping: Mapping[str, MtlsIdentity]
) -> Identity | None:
    """The identity of a verified client certificate: its URI SANs (SPIFFE ids) first, then its
    subject common name. grpc only fills these after the handshake verified the chain."""
    names = [n.decode() for n in auth_context.get("x509_subject_alternative_name", [])]
    names += [n.decode() for n in auth_context.get("x509_common_name", [])]
    for name in names:
        entry = mapping.get(name)
        if entry is not None:
            return Identity(
                subject=name,
                tenant=entry.tenant,
                scopes=entry.scopes,
                method="mtls",
                tier=entry.tier,
            )
    if names:
        raise Unauthenticated(
            "the client certificate is valid but not mapped to a tenant "
            "(guard.auth.mtls_identities)"
        )
    return None


class AuthzLink:
    name = "authz"

    def __init__(self, config: AuthzConfig) -> None:
        self._config = config

    async def before(self, scope: CallScope) -> None:
        assert scope.identity is not None
        check_method(self._config, scope.identity, scope.method)
        if self._config.tenant_models:
            scope.model_hooks.append(self._check_model)
        scope.scope_hooks.append(self._check_scope)

    def _check_model(self, scope: CallScope) -> None:
        assert scope.identity is not None
        check_model(self._config, scope.identity, scope.model)

    def _check_scope(self, scope: CallScope, needed: str, why: str) -> None:
        assert scope.identity is not None
        check_scope(scope.identity, needed, scope.method, why)


class RateLimitLink:
    name = "rate_limit"

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def before(self, scope: CallScope) -> None:
        if scope.method in TOKEN_METHODS:
            scope.admit_hooks.append(self._admit)
        else:
            await self._admit(scope, 0, False)

    async def _admit(self, scope: CallScope, tokens: int, stream: bool) -> None:
        identity = scope.identity
        assert identity is not None
        reservation = await self._limiter.reserve(
            tenant=identity.tenant,
            key_id=identity.key_id,
            tier=identity.tier,
            tokens=tokens,
            stream=stream,
            prompt_tokens=scope.prompt_tokens,
        )

        async def settle(done: CallScope, held: Reservation = reservation) -> None:
            # A remote server's own count may have replaced the estimate reserved for.
            held.prompt_tokens = done.prompt_tokens
            await self._limiter.settle(
                held, used_tokens=done.prompt_tokens + done.completion_tokens
            )

        scope.settle_hooks.append(settle)


def _note(scope: CallScope, findings: Iterable[Finding]) -> None:
    scope.findings.extend(f"{f.policy}:{f.kind}:{f.action}" for f in findings)


class _InputAdapter:
    def __init__(self, guard: InputGuard, scope: CallScope) -> None:
        self._guard = guard
        self._scope = scope

    def check(self, text: str) -> str:
        try:
            result = self._guard.check(text)
        except GuardrailViolation as exc:
            _note(self._scope, exc.findings)
            raise
        _note(self._scope, result.findings)
        return result.text


class _StreamAdapter:
    def __init__(self, guard: OutputGuard, scope: CallScope) -> None:
        self._stream = guard.new_stream()
        self._scope = scope

    def feed(self, delta: str) -> tuple[str, str | None]:
        return self._result(self._stream.feed(delta))

    def finish(self) -> tuple[str, str | None]:
        result = self._result(self._stream.finish())
        _note(self._scope, self._stream.findings)
        return result

    def _result(self, result: FilterResult) -> tuple[str, str | None]:
        if not result.stop:
            return result.text, None
        _note(self._scope, self._stream.findings)
        return result.text, result.reason or "content filter"


class GuardrailsLink:
    name = "guardrails"

    def __init__(self, inputs: InputGuard, outputs: OutputGuard) -> None:
        self._input = inputs if inputs.enabled else None
        self._outputs = outputs if outputs.enabled else None

    async def before(self, scope: CallScope) -> None:
        if self._input is not None:
            scope.input_filter = _InputAdapter(self._input, scope)
        outputs = self._outputs
        if outputs is not None:
            scope.output_filter_factory = lambda: _StreamAdapter(outputs, scope)


class Guard:
    """The guard chain plus what it owns; `start()` on the running loop, `close()` at shutdown."""

    def __init__(
        self, config: GuardConfig, metrics: Metrics, registry_db: RegistryConfig | None = None
    ) -> None:
        """`registry_db`: the registry database, where the API keys live unless guard.auth.registry
        names a file of their own (None: the registry is off)."""
        self.config = config
        self.recorder = CallRecorder(metrics, config.audit_log)
        self.key_store: KeyStore | None = None
        self.authenticator: Authenticator | None = None
        self.limiter: RateLimiter | None = None
        links: list[Link] = [RequestContextLink()]
        auth = config.auth
        if auth.enabled:
            if auth.api_keys:
                registry_db = registry_db or RegistryConfig(enabled=False)
                self.key_store = open_key_store(keys_location(auth, registry_db))
            self.authenticator = Authenticator(auth.config, api_keys=self.key_store)
            links.append(AuthLink(self.authenticator, auth.mtls_identities))
            links.append(AuthzLink(config.authz))
        else:
            links.append(TrustedLink())
        if config.rate_limit.enabled:
            self.limiter = RateLimiter(config.rate_limit.config)
            limiter = self.limiter
            registry = metrics.registry
            Gauge(
                "irouter_rate_limit_redis_errors",
                "Redis limiter calls that failed or timed out",
                registry=registry,
            ).set_function(lambda: limiter.redis_errors)
            Gauge(
                "irouter_rate_limit_fallbacks",
                "Calls limited locally because Redis was down",
                registry=registry,
            ).set_function(lambda: limiter.fallbacks)
            links.append(RateLimitLink(self.limiter))
        if config.guardrails.enabled:
            rails = config.guardrails.config
            links.append(GuardrailsLink(InputGuard(rails), OutputGuard(rails)))
        self.chain = GuardChain(
            links,
            public=is_public,
            observer=self.recorder,
            default_timeout_s=config.default_timeout_s or None,
        )

    async def start(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.start()

    async def close(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.aclose()
        if self.key_store is not None:
            self.key_store.close()
        if self.limiter is not None:
            await self.limiter.close()
        self.recorder.close()

"""The guard chain on a real server: API keys and JWTs, scopes, rate limits and token quotas,
input and output guardrails, the audit log."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from router.config import ModelConfig
from router.guard.auth_config import AuthConfig, IssuerConfig
from router.guard.config import AuthSection, GuardConfig, GuardrailsSection, RateLimitSection
from router.guard.guardrails_config import GuardrailPolicy, GuardrailsConfig
from router.guard.limits.config import RateLimitConfig, TierLimits
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.registry.keys import KeyStore
from router.server import RouterServer
from tests.integration.conftest import EMB, GEN, make_config, running
from tests.integration.rest_proxy import serve_proxy

SECRET = "a-shared-secret-of-at-least-32-bytes!!"
ISSUER = "https://issuer.test"


@pytest.fixture(scope="module")
async def guarded(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RouterServer, Path]]:
    tmp = tmp_path_factory.mktemp("guard")
    tiers = {
        "default": TierLimits(
            requests_per_minute=1000, tokens_per_minute=100_000, max_concurrent_streams=8
        ),
        "tiny": TierLimits(requests_per_minute=3, tokens_per_minute=400, max_concurrent_streams=2),
    }
    guard = GuardConfig(
        audit_log=str(tmp / "audit.jsonl"),
        auth=AuthSection(
            enabled=True,
            registry=tmp / "registry.db",
            config=AuthConfig(
                issuers=(IssuerConfig(issuer=ISSUER, audience="irouter", shared_secret=SECRET),)
            ),
        ),
        rate_limit=RateLimitSection(enabled=True, config=RateLimitConfig(tiers=tiers)),
        guardrails=GuardrailsSection(
            enabled=True,
            config=GuardrailsConfig(
                policies=(
                    GuardrailPolicy(name="pii", pii={"credit_card": "reject"}, applies_to="input"),
                    GuardrailPolicy(name="no-paris", terms=("Paris",), applies_to="output"),
                )
            ),
        ),
    )
    config = make_config(
        model_cache,
        tmp,
        ModelConfig(name=GEN, kind="generate", artifact=GEN, max_slots=4, max_context=512),
        ModelConfig(name=EMB, kind="embed", artifact=EMB),
        guard=guard,
    )
    async with running(config) as server:
        yield server, tmp


@pytest.fixture(scope="module")
async def stub(guarded: tuple[RouterServer, Path]) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    server, _ = guarded
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def make_key(
    tmp: Path, *scopes: str, tier: str = "default", tenant: str = "acme"
) -> tuple[str, str]:
    store = KeyStore(tmp / "registry.db")
    try:
        return store.create(tenant, frozenset(scopes), tier=tier)
    finally:
        store.close()


def key_md(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


async def error_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


def hello(n: int = 2) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=GEN, prompt="Hello", sampling=pb.SamplingParams(max_tokens=n, temperature=0)
    )


async def test_calls_without_credentials_are_refused_but_health_is_public(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    err = await error_of(stub.ListModels(pb.ListModelsRequest()))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "x-api-key" in (err.details() or "")
    server, _ = guarded
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_api_key_scopes_and_revocation(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    _, tmp = guarded
    key_id, key = make_key(tmp, "inference:generate")
    assert (await stub.Complete(hello(), metadata=key_md(key))).usage.completion_tokens >= 1
    err = await error_of(stub.Embed(pb.EmbedRequest(model=EMB, texts=["x"]), metadata=key_md(key)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "inference:embed" in (err.details() or "")
    store = KeyStore(tmp / "registry.db")  # another connection, as `irouter keys revoke` is
    store.revoke(key_id)
    store.close()
    err = await error_of(stub.Complete(hello(), metadata=key_md(key)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert key not in (err.details() or "")


async def test_jwt_from_a_shared_secret_issuer(stub: pb_grpc.InferenceServiceStub) -> None:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "irouter",
        "sub": "svc-a",
        "tenant": "globex",
        "scope": "inference:generate",
        "exp": now + 300,
        "iat": now,
    }
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    md = (("authorization", f"Bearer {token}"),)
    assert (await stub.Complete(hello(), metadata=md)).usage.completion_tokens >= 1
    expired = jwt.encode({**claims, "exp": now - 600}, SECRET, algorithm="HS256")
    err = await error_of(stub.Complete(hello(), metadata=(("authorization", f"Bearer {expired}"),)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (err.details() or "")
    forged = jwt.encode(claims, "another-secret-that-is-also-32-bytes-long", algorithm="HS256")
    err = await error_of(stub.Complete(hello(), metadata=(("authorization", f"Bearer {forged}"),)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_request_rate_limit_names_the_quota_and_when_to_retry(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    _, tmp = guarded
    _, key = make_key(tmp, "inference:generate", tier="tiny", tenant="small-co")
    for _ in range(3):
        await stub.ListModels(pb.ListModelsRequest(), metadata=key_md(key))
    err = await error_of(stub.ListModels(pb.ListModelsRequest(), metadata=key_md(key)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "small-co" in (err.details() or "")
    status = rpc_status.from_call(err)
    assert status is not None
    kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
    assert {"RetryInfo", "QuotaFailure"} <= kinds
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            assert failure.violations and failure.violations[0].subject


async def test_token_quota_larger_than_the_tier_is_refused_at_once(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    _, tmp = guarded
    _, key = make_key(tmp, "inference:generate", tier="tiny", tenant="thrifty")
    err = await error_of(stub.Complete(hello(450), metadata=key_md(key)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "token" in (err.details() or "")


async def test_input_guardrail_names_the_policy_never_the_secret(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    _, tmp = guarded
    _, key = make_key(tmp, "inference:generate")
    card = "4111 1111 1111 1111"
    request = pb.CompleteRequest(model=GEN, prompt=f"My card is {card}, remember it")
    err = await error_of(stub.Complete(request, metadata=key_md(key)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert "pii" in details and "credit_card" in details and card not in details


async def test_output_guardrail_stops_the_stream(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    _, tmp = guarded
    _, key = make_key(tmp, "inference:generate")
    request = pb.GenerateRequest(
        model=GEN,
        chat=pb.ChatMessages(
            messages=[pb.ChatMessage(role="user", content="What is the capital of France?")]
        ),
        sampling=pb.SamplingParams(max_tokens=32, temperature=0),
    )
    chunks = [c async for c in stub.Generate(request, metadata=key_md(key))]
    text = "".join(c.text for c in chunks)
    assert "Paris" not in text
    assert chunks[-1].finish_reason == pb.FINISH_REASON_CONTENT_FILTER
    assert "no-paris" in chunks[-1].filter_reason


async def test_audit_log_has_one_line_per_call_and_no_credentials(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    server, tmp = guarded
    _, key = make_key(tmp, "inference:generate", tenant="audited")
    await stub.Complete(hello(3), metadata=key_md(key))
    await error_of(stub.Embed(pb.EmbedRequest(model=EMB, texts=["x"]), metadata=key_md(key)))
    assert server.guard is not None
    # The client has its status as soon as the server sends it; the server records the call
    # when its handler ends, a moment later: wait for both lines.
    for _ in range(250):
        server.guard.recorder.flush()
        text = (tmp / "audit.jsonl").read_text()
        lines = [json.loads(row) for row in text.splitlines()]
        mine = [r for r in lines if r["tenant"] == "audited"]
        if len(mine) >= 2:
            break
        await asyncio.sleep(0.02)
    assert key not in text
    assert [(r["method"].rsplit("/", 1)[-1], r["status"]) for r in mine] == [
        ("Complete", "OK"),
        ("Embed", "PERMISSION_DENIED"),
    ]
    assert mine[0]["model"] == GEN and mine[0]["completion_tokens"] == 3
    assert mine[0]["prompt_tokens"] >= 1 and mine[0]["request_id"]
    blocked = [r for r in lines if r.get("guardrails")]
    assert any("pii:credit_card:reject" in r["guardrails"] for r in blocked)
    assert any("no-paris:term:reject" in r["guardrails"] for r in blocked)


async def test_calls_without_a_deadline_get_the_server_default(
    model_cache: Path, tmp_path: Path
) -> None:
    config = make_config(
        model_cache,
        tmp_path,
        ModelConfig(name=GEN, kind="generate", artifact=GEN, max_slots=2, max_context=1024),
        retrieval=False,
        guard=GuardConfig(default_timeout_s=0.5),
    )
    server = RouterServer(config)
    await server.start()
    await server.wait_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            long = pb.CompleteRequest(
                model=GEN,
                prompt="Count:",
                sampling=pb.SamplingParams(max_tokens=900, temperature=0, ignore_eos=True),
            )
            err = await error_of(stub.Complete(long))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "default deadline of 0.5 s" in (err.details() or "")
            # A client deadline of its own is left alone (here: longer than the default).
            short = pb.CompleteRequest(
                model=GEN, prompt="Hi", sampling=pb.SamplingParams(max_tokens=2)
            )
            assert (await stub.Complete(short, timeout=30)).usage.completion_tokens >= 1
        engine = server.models.get(GEN, "generate").engine
        assert engine is not None and engine.num_unfinished == 0
    finally:
        await server.stop(0)


async def test_the_retrieval_option_needs_retrieval_read(
    guarded: tuple[RouterServer, Path], stub: pb_grpc.InferenceServiceStub
) -> None:
    _, tmp = guarded
    request = hello()
    request.retrieval.collection = "no-such-collection"
    _, plain = make_key(tmp, "inference:generate")
    err = await error_of(stub.Complete(request, metadata=key_md(plain)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'retrieval:read' needed by the retrieval option" in (err.details() or "")
    _, reader = make_key(tmp, "inference:generate", "retrieval:read")
    err = await error_of(stub.Complete(request, metadata=key_md(reader)))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # past the guard, to the collection lookup


async def test_the_in_process_openai_routes_run_the_same_guard(
    guarded: tuple[RouterServer, Path],
) -> None:
    server, tmp = guarded
    _, key = make_key(tmp, "inference:generate", "inference:read")
    body = {"model": GEN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    async with (
        serve_proxy(f"127.0.0.1:{server.port}", server.local_handlers) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        refused = await http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 401, refused.text
        assert "x-api-key" in refused.json()["error"]["message"]
        answered = await http.post("/v1/chat/completions", json=body, headers={"x-api-key": key})
        assert answered.status_code == 200, answered.text
        # The output guardrail applies as over gRPC (test_output_guardrail_stops_the_stream).
        paris = [{"role": "user", "content": "What is the capital of France?"}]
        filtered = await http.post(
            "/v1/chat/completions",
            json={**body, "messages": paris, "max_tokens": 32, "temperature": 0},
            headers={"x-api-key": key},
        )
        choice = filtered.json()["choices"][0]
        assert choice["finish_reason"] == "content_filter", choice
        assert "Paris" not in choice["message"]["content"]

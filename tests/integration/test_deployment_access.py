"""A deployment's own access rules on a router with its guard on (API keys, anonymous callers
allowed): a deployment that requires authentication refuses anonymous callers by name, and its
per-tier frequency limits count each tenant's calls to it alone (default 2 a minute, premium
100), the way an administrator offers a model to a platform's users."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from router.guard.auth_config import AuthConfig
from router.guard.config import AuthSection, GuardConfig
from router.proto.irouter.v1 import deployment_service_pb2 as pb
from router.proto.irouter.v1 import deployment_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as inference_grpc
from router.proto.irouter.v1 import model_service_pb2 as model_pb
from router.proto.irouter.v1 import model_service_pb2_grpc as model_grpc
from router.registry.keys import KeyStore
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config, running
from tests.integration.registry_calls import EMBEDDER, TIMEOUT, register, status_of

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
async def served(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RouterServer, Path]]:
    tmp = tmp_path_factory.mktemp("access")
    keys = tmp / "keys.db"
    auth = AuthConfig(
        allow_anonymous=True, anonymous_scopes=frozenset({"inference:generate", "admin"})
    )
    guard = GuardConfig(auth=AuthSection(enabled=True, registry=keys, config=auth))
    config = make_config(model_cache, tmp, EMBEDDER, retrieval=False, guard=guard)
    async with running(config) as router:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            version = model_pb.ModelVersion(
                name="smol",
                version="1",
                kind=inference_pb.MODEL_KIND_GENERATE,
                artifact=model_pb.Artifact(package=GEN),
            )
            await register(model_grpc.ModelServiceStub(channel), version)
            deployment = pb.Deployment(
                name="private",
                model_name="smol",
                model_version="1",
                replicas=[pb.Replica(name="r0")],
                threads=1,
                max_slots=2,
                max_context=256,
                prefix_cache_mb=0,
                require_auth=True,
                limits=[
                    pb.TierLimit(
                        tier="default",
                        requests_per_minute=2,
                        tokens_per_minute=100_000,
                        max_concurrent_streams=4,
                    ),
                    pb.TierLimit(
                        tier="premium",
                        requests_per_minute=100,
                        tokens_per_minute=1_000_000,
                        max_concurrent_streams=16,
                    ),
                ],
            )
            stub = pb_grpc.DeploymentServiceStub(channel)
            created = await stub.CreateDeployment(
                pb.CreateDeploymentRequest(deployment=deployment), timeout=TIMEOUT
            )
            assert created.deployment.require_auth
            assert [t.tier for t in created.deployment.limits] == ["default", "premium"]
        yield router, keys


def key(keys: Path, tenant: str, tier: str) -> Metadata:
    store = KeyStore(keys)
    try:
        _, plaintext = store.create(tenant, {"inference:generate"}, tier=tier)
    finally:
        store.close()
    return (("authorization", f"Bearer {plaintext}"),)


async def complete(server: RouterServer, metadata: Metadata = ()) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_grpc.InferenceServiceStub(channel)
        request = inference_pb.CompleteRequest(
            model="private",
            prompt="Hello",
            sampling=inference_pb.SamplingParams(max_tokens=2, temperature=0.0),
            cache_mode=inference_pb.CACHE_MODE_BYPASS,
        )
        answer = await stub.Complete(request, metadata=metadata, timeout=TIMEOUT)
        return answer.text


async def test_anonymous_callers_are_refused_by_name(served: tuple[RouterServer, Path]) -> None:
    server, _ = served
    code, message = await status_of(complete(server))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "deployment 'private' serves authenticated callers only" in message


async def test_each_tier_has_its_own_frequency_limit(served: tuple[RouterServer, Path]) -> None:
    server, keys = served
    default = key(keys, "acme", "default")
    assert await complete(server, default) is not None
    assert await complete(server, default) is not None
    code, message = await status_of(complete(server, default))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    premium = key(keys, "globex", "premium")
    for _ in range(3):
        await complete(server, premium)
    # Another tenant of the default tier has buckets of its own.
    assert await complete(server, key(keys, "initech", "default")) is not None

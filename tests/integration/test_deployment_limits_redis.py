"""An embedding deployment's own access rules across two routers sharing one registry and one
Redis (the guard's rate limiter on Redis): its per-tier limits count a tenant's calls through
either router together, its authentication holds on Embed, and a collection cannot embed
through it (its rules are for its own callers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from router.guard.auth_config import AuthConfig
from router.guard.config import AuthSection, GuardConfig, RateLimitSection
from router.guard.limits.config import RateLimitConfig
from router.proto.irouter.v1 import deployment_service_pb2 as pb
from router.proto.irouter.v1 import deployment_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as inference_grpc
from router.proto.irouter.v1 import model_service_pb2_grpc as model_grpc
from router.proto.irouter.v1 import retrieval_service_pb2 as retrieval_pb
from router.proto.irouter.v1 import retrieval_service_pb2_grpc as retrieval_grpc
from router.registry.config import RegistryConfig
from router.registry.keys import open_key_store
from router.server import RouterServer
from tests.integration.conftest import make_config, running
from tests.integration.registry_calls import EMBEDDER, TIMEOUT, minilm, register, status_of
from tests.redis_server import RedisServer, redis_server_path, running_redis

pytestmark = pytest.mark.skipif(redis_server_path() is None, reason="needs a redis-server binary")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
async def routers(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> AsyncIterator[tuple[RouterServer, RouterServer, RegistryConfig]]:
    registry = RegistryConfig(data_dir=tmp_path_factory.mktemp("registry"))
    auth = AuthConfig(allow_anonymous=True, anonymous_scopes=frozenset({"admin"}))
    limits = RateLimitConfig(store="redis", redis_url=redis_server.url, redis_timeout_s=1.0)
    guard = GuardConfig(
        auth=AuthSection(enabled=True, config=auth),
        rate_limit=RateLimitSection(enabled=True, config=limits),
    )

    def config(name: str, retrieval: bool) -> object:
        folder = tmp_path_factory.mktemp(name)
        return make_config(
            model_cache, folder, EMBEDDER, retrieval=retrieval, registry=registry, guard=guard
        )

    async with running(config("a", True)) as a, running(config("b", False)) as b:  # type: ignore[arg-type]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as channel:
            await register(model_grpc.ModelServiceStub(channel), minilm("mini"))
            deployment = pb.Deployment(
                name="vecs",
                model_name="mini",
                model_version="1",
                replicas=[pb.Replica(name="r0")],
                threads=1,
                require_auth=True,
                limits=[
                    pb.TierLimit(
                        tier="default",
                        requests_per_minute=2,
                        tokens_per_minute=100_000,
                        max_concurrent_streams=4,
                    )
                ],
            )
            await pb_grpc.DeploymentServiceStub(channel).CreateDeployment(
                pb.CreateDeploymentRequest(deployment=deployment), timeout=TIMEOUT
            )
        await until_served(b, "vecs")
        yield a, b, registry


async def until_served(router: RouterServer, name: str) -> None:
    """Wait for the other router to follow the registry (it polls every second or so)."""
    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = inference_grpc.InferenceServiceStub(channel)
        while True:
            listed = await stub.ListModels(inference_pb.ListModelsRequest(), timeout=TIMEOUT)
            found = [m for m in listed.models if m.name == name and m.ready]
            if found and all(r.healthy for r in found[0].replicas):
                return
            assert time.monotonic() < deadline, f"{name} never served by the second router"
            await asyncio.sleep(0.2)


async def embed(router: RouterServer, key: str = "") -> inference_pb.EmbedResponse:
    metadata = (("x-api-key", key),) if key else ()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        return await inference_grpc.InferenceServiceStub(channel).Embed(
            inference_pb.EmbedRequest(model="vecs", texts=["hello"]),
            metadata=metadata,
            timeout=TIMEOUT,
        )


async def test_limits_count_a_tenant_s_calls_through_every_router(
    routers: tuple[RouterServer, RouterServer, RegistryConfig],
) -> None:
    a, b, registry = routers
    store = open_key_store(registry.resolved_url())  # the keys are the shared registry's too
    try:
        _, key = store.create("acme", {"inference:embed"})
        _, other = store.create("globex", {"inference:embed"})
    finally:
        store.close()
    code, message = await status_of(embed(a))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "'vecs'" in message, message
    await embed(a, key)
    await embed(b, key)
    code, message = await status_of(embed(a, key))  # the third of 2 a minute, on either router
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    code, _ = await status_of(embed(b, key))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await embed(b, other)).embeddings  # another tenant has buckets of its own


async def test_a_collection_cannot_embed_through_a_deployment_with_rules(
    routers: tuple[RouterServer, RouterServer, RegistryConfig],
) -> None:
    a, _, _ = routers
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as channel:
        config = retrieval_pb.CollectionConfig(
            name="docs", metric=retrieval_pb.METRIC_COSINE, embedding_model="vecs"
        )
        call = retrieval_grpc.RetrievalServiceStub(channel).CreateCollection(
            retrieval_pb.CreateCollectionRequest(config=config), timeout=TIMEOUT
        )
        code, message = await status_of(call)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "its own authentication" in message

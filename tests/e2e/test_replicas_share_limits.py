"""Three router processes sharing one redis-server: a tenant's limit holds globally and exactly,
not per replica (the known failure of per-replica limiters)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import yaml

from loadtest.processes import wait_serving
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.registry.keys import KeyStore
from tests.e2e.conftest import RouterProcess
from tests.redis_server import redis_server_path, running_redis

LIMIT = 12


@pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not installed")
def test_three_replicas_admit_exactly_the_tenant_limit(model_cache: Path, tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "registry.db")
    _, key = store.create("acme", frozenset({"inference:embed"}))
    store.close()
    with running_redis(tmp_path / "redis") as redis:
        config = tmp_path / "router.yaml"
        tier = {
            "requests_per_minute": LIMIT,
            "tokens_per_minute": 100_000,
            "max_concurrent_streams": 4,
        }
        config.write_text(
            yaml.safe_dump(
                {
                    "models": [
                        {
                            "name": "all-minilm-l6-v2",
                            "kind": "embed",
                            "artifact": "all-minilm-l6-v2",
                        }
                    ],
                    "guard": {
                        "auth": {"enabled": True, "registry": str(tmp_path / "registry.db")},
                        "rate_limit": {
                            "enabled": True,
                            "config": {
                                "store": "redis",
                                "redis_url": redis.url,
                                "on_redis_error": "closed",
                                "redis_timeout_s": 2.0,
                                "tiers": {"default": tier},
                            },
                        },
                    },
                }
            )
        )
        routers = [RouterProcess(model_cache, config=config) for _ in range(3)]
        try:
            for router in routers:
                wait_serving(router.target)
            codes = asyncio.run(_race([r.target for r in routers], key, calls=3 * LIMIT))
        finally:
            for router in routers:
                router.stop()
    assert codes.count(grpc.StatusCode.OK) == LIMIT, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2 * LIMIT, codes


async def _race(targets: list[str], key: str, calls: int) -> list[grpc.StatusCode]:
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]

    async def one(i: int) -> grpc.StatusCode:
        try:
            await stubs[i % len(stubs)].Embed(
                pb.EmbedRequest(model="all-minilm-l6-v2", texts=[f"text {i}"]),
                metadata=(("x-api-key", key),),
                timeout=30,
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    try:
        return list(await asyncio.gather(*(one(i) for i in range(calls))))
    finally:
        for channel in channels:
            await channel.close()

"""A health check's verdict on a replica removed while it was probed is dropped: it must not
put the replica back (its deployment's routing no longer knows it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from backends.remote import RemoteUnavailable
from router.config import ModelConfig
from router.routing.config import DeploymentConfig, HealthCheckConfig, ReplicaConfig
from router.routing.health import HealthChecker
from router.serving.catalog import Catalog
from router.serving.model import ServedModel
from router.telemetry import Metrics


class SlowProbe:
    """An engine whose readiness probe answers True once released."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.last_output_at = 0.0

    async def ready(self, timeout_s: float | None = None) -> bool:
        self.asked.set()
        await self.release.wait()
        return True


async def test_a_replica_removed_during_its_probe_stays_out() -> None:
    calls: list[tuple[str, str, bool]] = []
    dispatcher = SimpleNamespace(set_healthy=lambda *args: calls.append(args))
    catalog = cast(Catalog, SimpleNamespace(dispatcher=dispatcher))
    published: list[ServedModel] = []

    async def publish(model: ServedModel) -> None:
        published.append(model)

    config = ModelConfig(name="m", kind="generate", artifact="a")
    rc = ReplicaConfig(name="r0", backend="onnxruntime")
    replica = ServedModel(config, Path("a"), replica=rc)
    engine = SlowProbe()
    replica.engine = cast(Any, engine)
    shell = ServedModel(
        config,
        Path("a"),
        deployment=DeploymentConfig(name="d", replicas=(rc,)),
        replicas=(replica,),
    )
    checker = HealthChecker(catalog, Metrics(), publish)
    check = asyncio.create_task(checker.check_one(shell, replica, {}))
    await engine.asked.wait()
    shell.draining = True  # the deployment is being deleted; its replicas stop
    replica.ready = False
    engine.release.set()
    await check
    assert (replica.ready, calls, published) == (False, [], [])


class Server:
    """A remote embedding server giving vectors of `dimension` (0: down)."""

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension

    async def embed_counted(self, texts: list[str]) -> tuple[np.ndarray, int | None]:
        if not self.dimension:
            raise RemoteUnavailable("http://up", "connection refused")
        return np.ones((len(texts), self.dimension), dtype=np.float32), None


async def test_an_embedding_replica_is_probed_by_embedding_and_its_dimension() -> None:
    calls: list[tuple[str, str, bool]] = []
    dispatcher = SimpleNamespace(set_healthy=lambda *args: calls.append(args))
    catalog = cast(Catalog, SimpleNamespace(dispatcher=dispatcher))

    async def publish(model: ServedModel) -> None:
        pass

    config = ModelConfig(name="m", kind="embed", backend="openai_http")
    rc = ReplicaConfig(name="r0", backend="openai_http", url="http://up")
    replica = ServedModel(config, Path("."), replica=rc)
    server = Server(0)
    replica.remote_embedder = cast(Any, server)
    deployment = DeploymentConfig(
        name="d", replicas=(rc,), health_check=HealthCheckConfig(healthy_after=1)
    )
    shell = ServedModel(config, Path("."), deployment=deployment, replicas=(replica,))
    shell.dimension = 4
    replica.context_length = 512
    checker = HealthChecker(catalog, Metrics(), publish)
    runs: dict[str, int] = {}
    await checker.check_one(shell, replica, runs)  # down: stays out
    server.dimension = 8  # back, serving another model: its vectors would not compare
    await checker.check_one(shell, replica, runs)
    assert (replica.ready, calls) == (False, [])
    server.dimension = 4
    await checker.check_one(shell, replica, runs)
    assert (replica.ready, calls) == (True, [("d", "r0", True)])

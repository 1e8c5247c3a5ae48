"""A health check's verdict on a replica removed while it was probed is dropped: it must not
put the replica back (its deployment's routing no longer knows it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from router.config import ModelConfig
from router.routing.config import DeploymentConfig, ReplicaConfig
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

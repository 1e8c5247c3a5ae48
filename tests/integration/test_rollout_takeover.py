"""A rollout whose router dies is taken over: two in-process routers share one registry, the
first starts a rollout of smol/1 → smol/2 and stops (as a crashed router's heartbeats stop),
and the second, once the first has been silent for the takeover's margin, runs the rollout on
to completion and records the takeover."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from router.control import reconcile
from router.proto.irouter.v1 import deployment_service_pb2 as pb
from router.proto.irouter.v1 import deployment_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import model_service_pb2 as model_pb
from router.proto.irouter.v1 import model_service_pb2_grpc as model_grpc
from router.registry import audit
from router.registry.config import RegistryConfig
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config, running
from tests.integration.registry_calls import EMBEDDER, TIMEOUT, register

STEP_S = 2.0


def smol(version: str, artifact: model_pb.Artifact) -> model_pb.ModelVersion:
    return model_pb.ModelVersion(
        name="smol", version=version, kind=inference_pb.MODEL_KIND_GENERATE, artifact=artifact
    )


async def deployment(router: RouterServer) -> pb.Deployment:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = pb_grpc.DeploymentServiceStub(channel)
        got = await stub.GetDeployment(pb.GetDeploymentRequest(name="roll"), timeout=TIMEOUT)
    return got.deployment


async def until(
    router: RouterServer, check: object, what: str, within_s: float = 60
) -> pb.Deployment:
    deadline = time.monotonic() + within_s
    while True:
        d = await deployment(router)
        if check(d):  # type: ignore[operator]
            return d
        assert time.monotonic() < deadline, f"{what}: {d}"
        await asyncio.sleep(0.25)


async def test_a_rollout_whose_router_stops_is_run_on_by_another(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "TAKEOVER_S", 3.0)
    registry = RegistryConfig(data_dir=tmp_path_factory.mktemp("registry"))

    def config(name: str) -> object:
        return make_config(
            model_cache, tmp_path_factory.mktemp(name), EMBEDDER, retrieval=False, registry=registry
        )

    first = RouterServer(config("first"))  # type: ignore[arg-type]
    await first.start()
    try:
        await first.wait_ready()
        async with running(config("second")) as second:  # type: ignore[arg-type]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
                models = model_grpc.ModelServiceStub(channel)
                await register(models, smol("1", model_pb.Artifact(package=GEN)))
                await register(models, smol("2", model_pb.Artifact(path=str(model_cache / GEN))))
                stub = pb_grpc.DeploymentServiceStub(channel)
                created = pb.Deployment(
                    name="roll",
                    model_name="smol",
                    model_version="1",
                    replicas=[pb.Replica(name="r0")],
                    threads=1,
                    max_slots=2,
                    max_context=256,
                    prefix_cache_mb=0,
                )
                await stub.CreateDeployment(
                    pb.CreateDeploymentRequest(deployment=created), timeout=TIMEOUT
                )
                request = pb.RolloutDeploymentRequest(
                    name="roll", target_version="2", steps=[50, 100], step_interval_s=STEP_S
                )
                started = (await stub.RolloutDeployment(request, timeout=TIMEOUT)).deployment
            owner = started.rollout.owner
            assert owner.endswith(f":{first.port}")
            # The first router stops at once: left running while the second loads the replicas,
            # it could finish the rollout itself (two 2 s steps; seen once in a full suite).
            await first.stop(0)
            # The second router mirrors the new version's replica (and the old one's until the
            # rollout it takes over completes).
            await until(
                second,
                lambda d: any(s.name == "r1" and s.ready for s in d.replica_states),
                "mirrored",
            )
            assert "roll/r1" in {r.name for r in second.models.replicas()}
            done = await until(
                second,
                lambda d: d.rollout.state != pb.ROLLOUT_STATE_RUNNING,
                "the rollout was not taken over and completed",
            )
            assert done.rollout.state == pb.ROLLOUT_STATE_COMPLETED, done.rollout.reason
            assert done.model_version == "2"
            assert done.rollout.owner.endswith(f":{second.port}")
            assert second.registry is not None
            actions = [e.action for e in audit.events(second.registry, target="deployment/roll")]
            assert "deployment.rollout_takeover" in actions, actions
            taken = next(
                e
                for e in audit.events(second.registry, target="deployment/roll")
                if e.action == "deployment.rollout_takeover"
            )
            assert taken.actor == "rollout" and f"taken over from {owner}" in str(taken.after)
    finally:
        await first.stop(0)

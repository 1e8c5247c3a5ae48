"""Rollouts on a real in-process router with traffic flowing: a deployment of smol/1 moved to
smol/2 by steps and judged at each (completed), then moved back with a TTFT bound no engine can
meet (rolled back at the first judged step), and the rollouts the router refuses by name.

Version 2 registers the prepared SmolLM2 folder by path (version 1 is the package): the same
tokenizer, as a rollout needs, served by new replicas. The tests share one deployment and run in
file order, each from where the previous one left it (as an administrator's session would)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from router import cli
from router.proto.irouter.v1 import deployment_service_pb2 as pb
from router.proto.irouter.v1 import deployment_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as inference_grpc
from router.proto.irouter.v1 import model_service_pb2 as model_pb
from router.proto.irouter.v1 import model_service_pb2_grpc as model_grpc
from router.registry import audit
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config, running
from tests.integration.registry_calls import EMBEDDER, TIMEOUT, register, status_of

STEP_S = 2.0


def smol(version: str, artifact: model_pb.Artifact) -> model_pb.ModelVersion:
    return model_pb.ModelVersion(
        name="smol", version=version, kind=inference_pb.MODEL_KIND_GENERATE, artifact=artifact
    )


@pytest.fixture(scope="module")
async def server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    config = make_config(model_cache, tmp_path_factory.mktemp("rollout"), EMBEDDER, retrieval=False)
    async with running(config) as router:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            models = model_grpc.ModelServiceStub(channel)
            await register(models, smol("1", model_pb.Artifact(package=GEN)))
            await register(models, smol("2", model_pb.Artifact(path=str(model_cache / GEN))))
            deployments = pb_grpc.DeploymentServiceStub(channel)
            deployment = pb.Deployment(
                name="roll",
                model_name="smol",
                model_version="1",
                replicas=[pb.Replica(name="r0")],
                threads=1,
                max_slots=4,
                max_context=256,
                prefix_cache_mb=0,
            )
            request = pb.CreateDeploymentRequest(deployment=deployment)
            await deployments.CreateDeployment(request, timeout=TIMEOUT)
        yield router


@pytest.fixture(scope="module")
async def channel(server: RouterServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel) -> pb_grpc.DeploymentServiceStub:
    return pb_grpc.DeploymentServiceStub(channel)


@contextlib.asynccontextmanager
async def traffic(channel: grpc.aio.Channel) -> AsyncIterator[list[str]]:
    """Calls to 'roll' one after another until the block ends; their texts (every call must
    succeed: a rollout never drops a call)."""
    inference = inference_grpc.InferenceServiceStub(channel)
    texts: list[str] = []

    async def loop() -> None:
        while True:
            request = inference_pb.CompleteRequest(
                model="roll",
                prompt="Name a colour:",
                sampling=inference_pb.SamplingParams(max_tokens=4, temperature=0.0),
                cache_mode=inference_pb.CACHE_MODE_BYPASS,  # every call reaches a replica
            )
            answer = await inference.Complete(request, timeout=TIMEOUT)
            texts.append(answer.text)

    task = asyncio.create_task(loop())
    try:
        yield texts
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def rollout_ends(stub: pb_grpc.DeploymentServiceStub) -> pb.Deployment:
    """The deployment once its rollout is no longer running."""
    for _ in range(240):
        got = await stub.GetDeployment(pb.GetDeploymentRequest(name="roll"), timeout=TIMEOUT)
        if got.deployment.rollout.state != pb.ROLLOUT_STATE_RUNNING:
            return got.deployment
        await asyncio.sleep(0.25)
    raise AssertionError("the rollout did not end within a minute")


async def roll_to(
    stub: pb_grpc.DeploymentServiceStub, version: str, **fields: object
) -> pb.Deployment:
    request = pb.RolloutDeploymentRequest(
        name="roll", target_version=version, steps=[50, 100], step_interval_s=STEP_S, **fields
    )
    return (await stub.RolloutDeployment(request, timeout=TIMEOUT)).deployment


async def test_a_rollout_moves_traffic_by_steps_and_completes(
    server: RouterServer, channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    async with traffic(channel) as texts:
        started = await roll_to(stub, "2", max_error_rate=0.5, min_calls=1)
        assert started.rollout.state == pb.ROLLOUT_STATE_RUNNING
        assert (started.rollout.from_version, started.rollout.step) == ("1", 0)
        assert [(r.name, r.model_version) for r in started.replicas] == [("r0", ""), ("r1", "2")]
        code, message = await status_of(
            stub.ScaleDeployment(pb.ScaleDeploymentRequest(name="roll", replica_count=2))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "rolling out" in message
        done = await rollout_ends(stub)
    assert done.rollout.state == pb.ROLLOUT_STATE_COMPLETED, done.rollout.reason
    assert "100% step passed" in done.rollout.reason
    assert done.model_version == "2"
    assert [(r.name, r.model_version) for r in done.replicas] == [("r1", "")]
    assert [s.ready for s in done.replica_states] == [True]
    assert len(texts) >= 2 and len(set(texts)) == 1  # greedy: the same answer on both versions
    actions = [e.action for e in audit.events(server.registry, target="deployment/roll")]  # type: ignore[arg-type]
    assert actions[-3:] == [
        "deployment.rollout",
        "deployment.rollout_step",
        "deployment.rollout_done",
    ]


async def test_a_failing_step_rolls_back_at_once(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    async with traffic(channel):
        await roll_to(stub, "1", max_ttft_p95_s=1e-6)  # no engine answers within a microsecond
        done = await rollout_ends(stub)
    assert done.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK
    assert "TTFT p95" in done.rollout.reason and "50% step" in done.rollout.reason
    assert done.model_version == "2"
    assert [r.name for r in done.replicas] == ["r1"]
    assert [s.name for s in done.replica_states] == ["r1"]


async def test_rollouts_that_cannot_run_are_refused_by_name(
    stub: pb_grpc.DeploymentServiceStub,
) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        ({"target_version": "2"}, grpc.StatusCode.FAILED_PRECONDITION, "already serves"),
        ({"target_version": "9"}, grpc.StatusCode.NOT_FOUND, "has no version '9'"),
        ({"target_version": "1", "steps": [50, 20, 100]}, invalid, "increase"),
        ({"target_version": "1", "steps": [50]}, invalid, "ending at 100"),
        ({"target_version": "1", "max_error_rate": 2.0}, invalid, "max_error_rate"),
        ({"target_version": "1", "target_replica": pb.Replica(backend="tpu")}, invalid, "tpu"),
    ]
    for fields, code, words in cases:
        request = pb.RolloutDeploymentRequest(name="roll", **fields)  # type: ignore[arg-type]
        got, message = await status_of(stub.RolloutDeployment(request, timeout=TIMEOUT))
        assert (got, words in message) == (code, True), message
    got, _ = await status_of(
        stub.RolloutDeployment(pb.RolloutDeploymentRequest(name="nope", target_version="1"))
    )
    assert got == grpc.StatusCode.NOT_FOUND


async def test_the_cli_starts_and_shows_rollouts(
    server: RouterServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", f"127.0.0.1:{server.port}")

    async def irouter(*argv: str) -> int:
        return await asyncio.to_thread(cli.main, list(argv))

    assert await irouter("deployments", "status", "roll", *target) == 0
    out, _ = capsys.readouterr()
    assert "roll: rollout 2 -> 1 rolled_back: " in out  # the previous test's rollback
    assert await irouter("deployments", "rollout", "roll", "2", *target) == 1
    _, err = capsys.readouterr()
    assert "FAILED_PRECONDITION" in err and "already serves version '2'" in err
    assert await irouter("deployments", "rollout", "roll", "1", "--steps", "half", *target) == 2

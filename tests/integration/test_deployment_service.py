"""DeploymentService on a real in-process router: a registered SmolLM2 version deployed at run
time and called by name, scaled up and down with streams in flight, listed by ListModels,
health and metrics, refused by name when it cannot be served (leaving nothing behind), kept in
use against deleting its version, brought back by a restart, and deleted (draining first).

The router's own config serves only the embedder; each deployment of SmolLM2 is small (4 slots
of 512 tokens, no prefix cache) so that several replicas fit and load quickly."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends._kernels import q4_best_kernel
from router import cli
from router.models.prepare import smollm2_gguf_path
from router.proto.irouter.v1 import deployment_service_pb2 as pb
from router.proto.irouter.v1 import deployment_service_pb2_grpc as pb_grpc
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as inference_grpc
from router.proto.irouter.v1 import model_service_pb2 as model_pb
from router.proto.irouter.v1 import model_service_pb2_grpc as model_grpc
from router.proto.irouter.v1 import resource_service_pb2 as resource_pb
from router.proto.irouter.v1 import resource_service_pb2_grpc as resource_grpc
from router.proto.irouter.v1 import usage_service_pb2 as usage_pb
from router.proto.irouter.v1 import usage_service_pb2_grpc as usage_grpc
from router.registry import audit
from router.server import RouterServer
from tests.fake_openai import FakeOpenAI, fake_openai
from tests.integration.conftest import EMB, GEN, make_config, running
from tests.integration.registry_calls import (
    EMBED,
    EMBEDDER,
    TIMEOUT,
    minilm,
    register,
    status_of,
)

SMOL = model_pb.ModelVersion(
    name="smol",
    version="1",
    kind=inference_pb.MODEL_KIND_GENERATE,
    artifact=model_pb.Artifact(package=GEN),
    input_price_per_1k="0.5",
    output_price_per_1k="1.5",
)


def small(name: str, replicas: int | list[pb.Replica] = 1, **fields: object) -> pb.Deployment:
    """A deployment of smol/1 sized for tests (`replicas`: how many local ones, or a list)."""
    if isinstance(replicas, int):
        replicas = [pb.Replica(name=f"r{i}") for i in range(replicas)]
    deployment = pb.Deployment(
        name=name,
        model_name="smol",
        model_version="1",
        replicas=replicas,
        threads=1,
        max_slots=4,
        max_context=512,
        prefix_cache_mb=0,
    )
    for key, value in fields.items():
        setattr(deployment, key, value)
    return deployment


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deployments")


@pytest.fixture(scope="module")
async def server(model_cache: Path, data_dir: Path) -> AsyncIterator[RouterServer]:
    config = make_config(model_cache, data_dir, EMBEDDER, retrieval=False)
    async with running(config) as router:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            await register(model_grpc.ModelServiceStub(channel), SMOL)
        yield router


@pytest.fixture(scope="module")
async def channel(server: RouterServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel) -> pb_grpc.DeploymentServiceStub:
    return pb_grpc.DeploymentServiceStub(channel)


async def create(stub: pb_grpc.DeploymentServiceStub, d: pb.Deployment) -> pb.Deployment:
    request = pb.CreateDeploymentRequest(deployment=d)
    return (await stub.CreateDeployment(request, timeout=TIMEOUT)).deployment


async def scale(stub: pb_grpc.DeploymentServiceStub, name: str, count: int) -> pb.Deployment:
    request = pb.ScaleDeploymentRequest(name=name, replica_count=count)
    return (await stub.ScaleDeployment(request, timeout=TIMEOUT)).deployment


async def generate(
    channel: grpc.aio.Channel, model: str, max_tokens: int = 8, ignore_eos: bool = False
) -> str:
    stub = inference_grpc.InferenceServiceStub(channel)
    request = inference_pb.GenerateRequest(
        model=model,
        prompt="The capital of France is",
        sampling=inference_pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos
        ),
    )
    chunks = [c async for c in stub.Generate(request, timeout=TIMEOUT)]
    assert chunks[-1].finish_reason
    return "".join(c.text for c in chunks)


async def say_hi(
    channel: grpc.aio.Channel, model: str, sampling: inference_pb.SamplingParams | None = None
) -> inference_pb.CompleteResponse:
    """A one-turn chat to `model`, past the cache (each call reaches the server)."""
    return await inference_grpc.InferenceServiceStub(channel).Complete(
        inference_pb.CompleteRequest(
            model=model,
            chat=inference_pb.ChatMessages(
                messages=[inference_pb.ChatMessage(role="user", content="Hi")]
            ),
            sampling=sampling,
            cache_mode=inference_pb.CACHE_MODE_BYPASS,
        ),
        timeout=TIMEOUT,
    )


async def served_names(channel: grpc.aio.Channel) -> set[str]:
    stub = inference_grpc.InferenceServiceStub(channel)
    answer = await stub.ListModels(inference_pb.ListModelsRequest(), timeout=TIMEOUT)
    return {m.name for m in answer.models}


async def health_of(channel: grpc.aio.Channel, name: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
    return int(answer.status)


async def test_a_deployment_serves_at_once_and_scales_with_streams_in_flight(
    server: RouterServer, channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    created = await create(stub, small("chat"))
    assert (created.generation, created.created_by) == (1, "anonymous")
    assert [(s.name, s.ready, s.error) for s in created.replica_states] == [("r0", True, "")]
    assert "chat" in await served_names(channel)
    assert await health_of(channel, "chat") == health_pb2.HealthCheckResponse.SERVING
    first = await generate(channel, "chat")
    assert first

    scaled = await scale(stub, "chat", 2)
    assert scaled.generation == 2
    assert [(s.name, s.ready) for s in scaled.replica_states] == [("r0", True), ("r1", True)]
    healthy = server.metrics.registry.get_sample_value(
        "irouter_replica_healthy", {"deployment": "chat", "replica": "r1"}
    )
    assert healthy == 1.0

    # Streams in flight on either replica finish while r1 leaves: it drains before it stops.
    # Long enough (no stop at EOS) to be seen under way however fast the replicas decode.
    streams = [
        asyncio.create_task(generate(channel, "chat", max_tokens=192, ignore_eos=True))
        for _ in range(4)
    ]

    async def r1_busy() -> bool:  # the stream(s) the balancer gave r1 are under way
        return any(r.outstanding for r in server.models.replica_samples() if r.replica == "r1")

    await eventually(r1_busy, every=0.01)
    down = await scale(stub, "chat", 1)
    assert [s.name for s in down.replica_states] == ["r0"]
    assert all(await asyncio.gather(*streams))
    assert await generate(channel, "chat") == first  # greedy: the same text on any replica
    got = await stub.GetDeployment(pb.GetDeploymentRequest(name="chat"), timeout=TIMEOUT)
    assert got.deployment.generation == 3


async def test_a_deployment_chooses_the_graph_its_replicas_compute_prompts_with(
    server: RouterServer, stub: pb_grpc.DeploymentServiceStub
) -> None:
    created = await create(
        stub, small("own-graph", prefill_graph="model", decode_kernel="onnxruntime")
    )
    try:
        assert (created.prefill_graph, created.decode_kernel) == ("model", "onnxruntime")
        (replica,) = [r for r in server.models.replicas() if r.name == "own-graph/r0"]
        assert replica.config.prefill_graph == "model"
        assert replica.config.decode_kernel == "onnxruntime"
        got = await stub.GetDeployment(pb.GetDeploymentRequest(name="own-graph"), timeout=TIMEOUT)
        assert got.deployment.prefill_graph == "model"
        assert got.deployment.decode_kernel == "onnxruntime"
    finally:
        await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="own-graph"), timeout=TIMEOUT)


async def test_refusals_name_the_reason_and_leave_nothing_behind(
    server: RouterServer, channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    models = model_grpc.ModelServiceStub(channel)
    await register(models, minilm("mini"))
    await register(models, model_pb.ModelVersion(**{**_fields(SMOL), "version": "old"}))
    await models.DeprecateModelVersion(
        model_pb.DeprecateModelVersionRequest(name="smol", version="old", reason="gone"),
        timeout=TIMEOUT,
    )
    cases = [
        (small("bad", model_version="9"), grpc.StatusCode.NOT_FOUND, "has no version '9'"),
        (small("bad", model_version="old"), grpc.StatusCode.FAILED_PRECONDITION, "deprecated"),
        (small("bad", model_name="mini"), grpc.StatusCode.INVALID_ARGUMENT, "max_slots=4"),
        (small(EMB), grpc.StatusCode.ALREADY_EXISTS, f"{EMB!r} is already served"),
        (small("bad", max_context=9000), grpc.StatusCode.INVALID_ARGUMENT, "above the context"),
        (small("Bad"), grpc.StatusCode.INVALID_ARGUMENT, "deployment.name"),
        (small("bad", require_auth=True), grpc.StatusCode.FAILED_PRECONDITION, "guard"),
        (small("bad", replicas=0), grpc.StatusCode.INVALID_ARGUMENT, "replicas is empty"),
        (small("bad", prefill_graph="fp8"), grpc.StatusCode.INVALID_ARGUMENT, "'fp8' is unknown"),
        (
            small(
                "bad", replicas=[pb.Replica(name="r0", backend="openvino")], prefill_graph="int8"
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prefill_graph 'int8' applies to onnxruntime replicas",
        ),
        (
            small("bad", model_name="mini", max_slots=0, prefill_graph="model"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prefill_graph=model applies to generation models",
        ),
        (small("bad", decode_kernel="gpu"), grpc.StatusCode.INVALID_ARGUMENT, "'gpu' is unknown"),
        (
            small("bad", model_name="mini", max_slots=0, decode_kernel="native"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "decode_kernel=native applies to generation models",
        ),
        (
            small("bad", replicas=[pb.Replica(name="r0", backend="tpu")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "backend 'tpu' is unknown",
        ),
        (
            # Nothing listens there: the only replica cannot warm up, so nothing is served.
            small(
                "bad",
                replicas=[pb.Replica(name="r0", backend="openai_http", url="http://127.0.0.1:9")],
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "could not be served",
        ),
    ]
    for deployment, code, words in cases:
        got, message = await status_of(create(stub, deployment))
        assert (got, words in message) == (code, True), message
    assert "bad" not in await served_names(channel)
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=TIMEOUT)
    assert "bad" not in [d.name for d in listed.deployments]
    assert not [e for e in audit.events(server.registry) if e.target == "deployment/bad"]  # type: ignore[arg-type]


def _fields(version: model_pb.ModelVersion) -> dict[str, object]:
    return {f.name: v for f, v in version.ListFields()}


async def test_a_version_in_use_cannot_be_deleted(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    await create(stub, small("pinned"))
    models = model_grpc.ModelServiceStub(channel)
    code, message = await status_of(
        models.DeleteModelVersion(
            model_pb.DeleteModelVersionRequest(name="smol", version="1"), timeout=TIMEOUT
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "in use by deployment(s) ['chat', 'pinned']" in message or "'pinned'" in message
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="pinned"), timeout=TIMEOUT)
    assert "pinned" not in await served_names(channel)
    code, message = await status_of(generate(channel, "pinned"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await status_of(
        stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="pinned"), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_a_restarted_router_serves_its_deployments_again(
    server: RouterServer, channel: grpc.aio.Channel, model_cache: Path, data_dir: Path
) -> None:
    # A second router on the same registry (the first one keeps serving): it restores "chat".
    config = make_config(model_cache, data_dir, EMBEDDER, retrieval=False)
    async with (
        running(config) as again,
        grpc.aio.insecure_channel(f"127.0.0.1:{again.port}") as other,
    ):
        assert "chat" in await served_names(other)
        assert await generate(other, "chat") == await generate(channel, "chat")
        stub = pb_grpc.DeploymentServiceStub(other)
        got = await stub.GetDeployment(pb.GetDeploymentRequest(name="chat"), timeout=TIMEOUT)
        assert [s.ready for s in got.deployment.replica_states] == [True]
    events = [e.action for e in audit.events(server.registry) if e.target == "deployment/chat"]  # type: ignore[arg-type]
    assert events[:3] == ["deployment.create", "deployment.scale", "deployment.scale"]


async def test_resources_list_the_host_and_refuse_what_does_not_fit(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    await create(stub, small("ledger"))
    resources = resource_grpc.ResourceServiceStub(channel)
    answer = await resources.GetResources(resource_pb.GetResourcesRequest(), timeout=TIMEOUT)
    assert answer.cpu_cores >= 1 and answer.cpu_model
    assert answer.memory_total_bytes > answer.memory_allocatable_bytes > 0
    assert "CPU" in [d.name for d in answer.devices]
    # No GPU on these machines, and the view says why; with one, it is listed instead.
    assert "cuda" in {d.kind for d in answer.devices} | {a.kind for a in answer.absent}
    held = {(a.model, a.replica): a for a in answer.allocations}
    ledger = held["ledger", "r0"]
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x K and V = 11,520 values a token, float16
    # where the native kernels compute every step (float32 where the graphs do).
    assert ledger.kv_bytes == 4 * 512 * 11_520 * (2 if q4_best_kernel() else 4)
    assert ledger.weight_bytes > 0 and ledger.threads == 1
    assert (EMB, "") in held
    assert answer.memory_allocated_bytes == sum(a.kv_bytes + a.weight_bytes for a in held.values())

    huge = small("huge", max_slots=256, max_context=8192, prefix_cache_mb=65536)
    code, message = await status_of(create(stub, huge))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert "MiB is free" in message
    assert "huge" not in await served_names(channel)
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="ledger"), timeout=TIMEOUT)


async def test_every_call_is_metered_at_its_version_s_prices(
    server: RouterServer, channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    await create(stub, small("metered"))
    for _ in range(3):
        await generate(channel, "metered")
    inference = inference_grpc.InferenceServiceStub(channel)
    await inference.Embed(inference_pb.EmbedRequest(model=EMB, texts=["a", "b"]), timeout=TIMEOUT)
    meter = usage_grpc.UsageServiceStub(channel)
    request = usage_pb.GetUsageRequest(group_by=["tenant", "deployment", "model", "version"])
    answer = await meter.GetUsage(request, timeout=TIMEOUT)
    rows = {r.deployment: r for r in answer.rows}
    metered = rows["metered"]
    assert (metered.tenant, metered.model, metered.version) == ("anonymous", "smol", "1")
    assert metered.calls == 3 and 0 < metered.output_tokens <= 3 * 8  # 8 each unless EOS
    expected = (
        Decimal("0.5") * metered.input_tokens + Decimal("1.5") * metered.output_tokens
    ) / 1000
    assert Decimal(metered.cost) == expected
    embedder = rows[EMB]
    assert (embedder.version, embedder.cost, embedder.calls) == ("", "0", 1)
    assert embedder.input_tokens > 0 and embedder.output_tokens == 0
    counted = server.metrics.registry.get_sample_value(
        "irouter_usage_tokens_total",
        {"tenant": "anonymous", "model": "metered", "version": "1", "kind": "output"},
    )
    assert counted == metered.output_tokens
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="metered"), timeout=TIMEOUT)


async def test_the_cli_drives_deployments_resources_and_usage(
    server: RouterServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ("--target", f"127.0.0.1:{server.port}")

    async def irouter(*argv: str) -> int:
        return await asyncio.to_thread(cli.main, list(argv))

    assert await irouter("deployments", "create", "cli", "--model", "smol", "--version", "1",
                         "--threads", "1", "--max-slots", "2", "--max-context", "256",
                         "--prefix-cache-mb", "0", *target) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert "loading cli's replicas" in err and "cli" in out and "yes" in out
    assert await irouter("deployments", "scale", "cli", "2", *target) == 0
    assert await irouter("deployments", "status", "cli", "--json", *target) == 0
    out, _ = capsys.readouterr()
    assert '"replica_count"' not in out and out.count('"ready": true') == 2
    assert await irouter("resources", *target) == 0
    out, _ = capsys.readouterr()
    assert "cpu:" in out and "cli" in out and "cuda" in out  # listed, or absent with why
    assert await irouter("usage", "--since", "1h", "--group-by", "deployment", *target) == 0
    out, _ = capsys.readouterr()
    assert "DEPLOYMENT" in out and "COST" in out
    assert await irouter("deployments", "delete", "cli", *target) == 0
    assert await irouter("deployments", "scale", "cli", "2", *target) == 1
    _, err = capsys.readouterr()
    assert "NOT_FOUND" in err and "'cli' does not exist" in err
    assert await irouter("usage", "--since", "soon", *target) == 2


async def eventually(
    check: Callable[[], Awaitable[bool]], seconds: float = 20.0, every: float = 0.25
) -> None:
    """Until `check` holds (routers converge about once a second)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "did not converge"
        await asyncio.sleep(every)


async def test_routers_sharing_a_registry_converge_without_a_restart(
    channel: grpc.aio.Channel,
    stub: pb_grpc.DeploymentServiceStub,
    model_cache: Path,
    data_dir: Path,
) -> None:
    config = make_config(model_cache, data_dir, EMBEDDER, retrieval=False)
    async with (
        running(config) as other,
        grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as there,
    ):
        elsewhere = pb_grpc.DeploymentServiceStub(there)

        async def replicas_there() -> list[str]:
            try:
                got = await elsewhere.GetDeployment(
                    pb.GetDeploymentRequest(name="shared"), timeout=TIMEOUT
                )
            except grpc.aio.AioRpcError:
                return []
            return [s.name for s in got.deployment.replica_states if s.ready]

        await create(stub, small("shared"))
        await eventually(lambda: _serving(there, "shared"))
        assert await generate(there, "shared") == await generate(channel, "shared")
        await scale(stub, "shared", 2)
        await eventually(lambda: _equals(replicas_there, ["r0", "r1"]))
        await scale(stub, "shared", 1)
        await eventually(lambda: _equals(replicas_there, ["r0"]))
        await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="shared"), timeout=TIMEOUT)
        await eventually(lambda: _lacks(there, "shared"))


async def _serving(channel: grpc.aio.Channel, name: str) -> bool:
    try:
        return await health_of(channel, name) == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:  # NOT_FOUND until health knows the name
        return False


async def _lacks(channel: grpc.aio.Channel, name: str) -> bool:
    return name not in await served_names(channel)


async def _equals(read: Callable[[], Awaitable[list[str]]], expected: list[str]) -> bool:
    return await read() == expected


async def test_a_watch_streams_each_change_until_the_deployment_is_deleted(
    stub: pb_grpc.DeploymentServiceStub,
) -> None:
    await create(stub, small("watched"))
    seen: list[tuple[int, tuple[bool, ...]]] = []

    async def watch() -> None:
        request = pb.WatchDeploymentRequest(name="watched")
        async for change in stub.WatchDeployment(request, timeout=TIMEOUT):
            states = tuple(s.ready for s in change.deployment.replica_states)
            seen.append((change.deployment.generation, states))

    watching = asyncio.create_task(watch())
    await eventually(lambda: _true(bool(seen)))
    await scale(stub, "watched", 2)
    await eventually(lambda: _true(seen[-1] == (2, (True, True))))
    before_delete = len(seen)
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="watched"), timeout=TIMEOUT)
    await asyncio.wait_for(watching, 30)  # the stream ends with the deployment
    assert seen[0] == (1, (True,)) and seen[before_delete - 1] == (2, (True, True))
    # A poll during the delete may still find it, its replicas draining (seen once in a full
    # run: 2, (False, False)): said as it is, and nothing else changes.
    assert all(generation == 2 for generation, _ in seen[before_delete:]), seen
    code, _ = await status_of(_drain(stub.WatchDeployment(pb.WatchDeploymentRequest(name="nope"))))
    assert code == grpc.StatusCode.NOT_FOUND


async def _true(value: bool) -> bool:
    return value


async def _drain(stream: AsyncIterator[object]) -> None:
    async for _ in stream:
        pass


async def register_remote(
    channel: grpc.aio.Channel, name: str, url: str, kind: int, context_length: int, **server: str
) -> None:
    """Version 1 of `name`: only a remote artifact, the OpenAI-compatible server at `url`
    (`server`: its dialect, api_version, api_key_env)."""
    remote = model_pb.RemoteArtifact(backend="openai_http", url=url, model="up", **server)
    version = model_pb.ModelVersion(
        name=name,
        version="1",
        kind=kind,  # type: ignore[arg-type]
        artifact=model_pb.Artifact(remote=remote),
        context_length=context_length,
    )
    await register(model_grpc.ModelServiceStub(channel), version)


async def test_a_remote_version_deploys_with_no_local_artifact(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    async with fake_openai() as fake:
        await register_remote(
            channel, "hosted", f"{fake.url}/v1", inference_pb.MODEL_KIND_GENERATE, 8192
        )
        local = small("hosted-local", model_name="hosted")  # a replica here needs an artifact
        got, message = await status_of(create(stub, local))
        assert got != grpc.StatusCode.OK and "artifact" in message, message
        bad = pb.Replica(name="r0", backend="openai_http", url=fake.url, dialect="tgi")
        got, message = await status_of(create(stub, small("hosted-bad", replicas=[bad])))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "replicas[0].dialect" in message
        replica = pb.Replica(
            name="r0", backend="openai_http", url=fake.url, remote_model="up", dialect="vllm"
        )
        await create(stub, small("hosted-dep", replicas=[replica], model_name="hosted"))
        try:
            top_k = inference_pb.SamplingParams(top_k=5)  # vLLM takes it
            answer = await say_hi(channel, "hosted-dep", top_k)
            assert answer.text == "ok" and answer.usage.source == inference_pb.USAGE_SOURCE_SERVER
            sent = fake.generations()[-1]
            assert sent.path == "/v1/chat/completions" and sent.body["top_k"] == 5
            assert sent.body["messages"] == [{"role": "user", "content": "Hi"}]
        finally:
            await stub.DeleteDeployment(
                pb.DeleteDeploymentRequest(name="hosted-dep"), timeout=TIMEOUT
            )


def embedder(name: str, version: str, replicas: list[pb.Replica]) -> pb.Deployment:
    return pb.Deployment(
        name=name, model_name=version, model_version="1", replicas=replicas, threads=1
    )


async def embed(channel: grpc.aio.Channel, model: str, texts: list[str]) -> np.ndarray:
    stub = inference_grpc.InferenceServiceStub(channel)
    answer = await stub.Embed(inference_pb.EmbedRequest(model=model, texts=texts), timeout=TIMEOUT)
    assert answer.model == model
    return np.array([e.values for e in answer.embeddings], dtype=np.float32)


async def test_an_embedding_version_deploys_scales_and_is_metered(
    server: RouterServer, channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    await register(model_grpc.ModelServiceStub(channel), minilm("vec"))
    slotted = embedder("vectors-bad", "vec", [pb.Replica(name="r0")])
    slotted.max_slots = 4
    got, message = await status_of(create(stub, slotted))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "max_slots=4 applies to gen" in message
    created = await create(stub, embedder("vectors", "vec", [pb.Replica(name="r0")]))
    assert [(s.name, s.ready) for s in created.replica_states] == [("r0", True)]
    texts = ["The capital of France is Paris.", "A spider has eight legs."]
    # The same packaged MiniLM as the router's own embedder: the same vectors.
    own = await embed(channel, EMB, texts)
    np.testing.assert_allclose(await embed(channel, "vectors", texts), own, atol=1e-5)
    await scale(stub, "vectors", 2)
    # Calls at once spread over both replicas (least outstanding; texts not cached yet).
    await asyncio.gather(*(embed(channel, "vectors", [f"text number {i}"]) for i in range(4)))
    attempts = {
        r: server.metrics.registry.get_sample_value(
            "irouter_routing_attempts_total", {"deployment": "vectors", "replica": r}
        )
        for r in ("r0", "r1")
    }
    assert all(attempts.values()), attempts
    listed = await inference_grpc.InferenceServiceStub(channel).ListModels(
        inference_pb.ListModelsRequest(), timeout=TIMEOUT
    )
    info = next(m for m in listed.models if m.name == "vectors")
    assert (info.kind, info.dimension, len(info.replicas)) == (EMBED, 384, 2)
    await register(model_grpc.ModelServiceStub(channel), minilm("vec", "2"))
    rollout = pb.RolloutDeploymentRequest(name="vectors", target_version="2")
    got, message = await status_of(stub.RolloutDeployment(rollout, timeout=TIMEOUT))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "not comparable" in message, message
    await scale(stub, "vectors", 1)
    meter = usage_grpc.UsageServiceStub(channel)
    answer = await meter.GetUsage(
        usage_pb.GetUsageRequest(group_by=["deployment", "model", "version"]), timeout=TIMEOUT
    )
    row = next(r for r in answer.rows if r.deployment == "vectors")
    assert (row.model, row.version, row.calls) == ("vec", "1", 5) and row.input_tokens > 0
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="vectors"), timeout=TIMEOUT)
    assert "vectors" not in await served_names(channel)


async def test_a_remote_embedding_version_fails_over_between_servers(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub
) -> None:
    async with fake_openai() as fake:
        await register_remote(
            channel, "hosted-vec", f"{fake.url}/v1", inference_pb.MODEL_KIND_EMBED, 512
        )
        replicas = [
            pb.Replica(name="gone", backend="openai_http", url="http://127.0.0.1:9"),
            pb.Replica(name="up", backend="openai_http", url=fake.url),
        ]
        created = await create(stub, embedder("hosted-vectors", "hosted-vec", replicas))
        states = {s.name: (s.ready, bool(s.error)) for s in created.replica_states}
        assert states == {"gone": (False, True), "up": (True, False)}
        try:
            for _ in range(3):
                vectors = await embed(channel, "hosted-vectors", ["abc", "hello"])
                np.testing.assert_array_equal(vectors[:, 0], [3.0, 5.0])  # the server's own
            # (health checks embed "ping" on the side: look for the calls' own requests)
            sent = [r for r in fake.requests if r.body.get("input") == ["abc", "hello"]]
            assert sent and all(r.path == "/v1/embeddings" for r in sent)
        finally:
            await stub.DeleteDeployment(
                pb.DeleteDeploymentRequest(name="hosted-vectors"), timeout=TIMEOUT
            )


async def test_a_gguf_file_is_prepared_when_first_deployed(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub, model_cache: Path
) -> None:
    gguf = smollm2_gguf_path()
    version = model_pb.ModelVersion(
        name="from-file",
        version="1",
        kind=inference_pb.MODEL_KIND_GENERATE,
        artifact=model_pb.Artifact(path=str(gguf)),
    )
    registered = await register(model_grpc.ModelServiceStub(channel), version)
    folder = model_cache / f"gguf-{registered.artifact_sha256[:16]}"
    shutil.rmtree(folder, ignore_errors=True)  # prepared by this deployment, not a past run
    await create(stub, small("from-file", model_name="from-file"))
    await create(stub, small("packaged"))
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert (manifest["source"], manifest["quantization"]) == (gguf.name, "int4")
        # The same GGUF as the packaged model, prepared the same way: the same greedy text.
        assert await generate(channel, "from-file", 12) == await generate(channel, "packaged", 12)
    finally:
        for name in ("from-file", "packaged"):
            await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=name), timeout=TIMEOUT)
        shutil.rmtree(folder, ignore_errors=True)


def assert_reached_azure(fake: FakeOpenAI, key: str) -> None:
    """The last generation call took the Azure deployment's route, with `key` and the API
    version."""
    sent = fake.generations()[-1]
    assert sent.path == "/openai/deployments/chat-deployment/chat/completions"
    assert sent.headers["api-key"] == key
    assert sent.query["api-version"] == "2024-10-21"


async def test_an_azure_replica_takes_its_key_from_the_routers_environment(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_openai() as fake:
        generate = inference_pb.MODEL_KIND_GENERATE
        await register_remote(channel, "hosted-az", f"{fake.url}/v1", generate, 8192)
        replica = pb.Replica(
            name="r0",
            backend="openai_http",
            url=f"{fake.url}/openai/deployments/chat-deployment",  # Azure: the deployment's URL
            dialect="azure",
            api_key_env="IROUTER_TEST_AZURE_KEY",
            api_version="2024-10-21",
        )
        azure = small("az", replicas=[replica], model_name="hosted-az")
        no_version = pb.Replica(name="r0", backend="openai_http", url=fake.url, dialect="azure")
        got, message = await status_of(create(stub, small("az", replicas=[no_version])))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "api_version" in message, message
        monkeypatch.delenv("IROUTER_TEST_AZURE_KEY", raising=False)
        got, message = await status_of(create(stub, azure))
        assert got == grpc.StatusCode.FAILED_PRECONDITION, message
        assert "IROUTER_TEST_AZURE_KEY" in message and "az" not in await served_names(channel)
        monkeypatch.setenv("IROUTER_TEST_AZURE_KEY", "sk-test-123")
        created = await create(stub, azure)
        try:
            assert created.replicas[0].api_key_env == "IROUTER_TEST_AZURE_KEY"
            assert "sk-test-123" not in str(created)  # the key is never stored or returned
            assert (await say_hi(channel, "az")).text == "ok"
            assert_reached_azure(fake, "sk-test-123")
        finally:
            await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="az"), timeout=TIMEOUT)


async def test_a_version_registered_as_an_azure_server_gives_its_replicas_its_key(
    channel: grpc.aio.Channel, stub: pb_grpc.DeploymentServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_env = "IROUTER_TEST_AZURE_VERSION_KEY"
    async with fake_openai() as fake:
        azure = f"{fake.url}/openai/deployments/chat-deployment"
        server = {"dialect": "azure", "api_version": "2024-10-21", "api_key_env": key_env}
        generate = inference_pb.MODEL_KIND_GENERATE
        await register_remote(channel, "hosted-azv", azure, generate, 8192, **server)
        # The replica names only its url: dialect, API version and key are the version's.
        replica = pb.Replica(name="r0", backend="openai_http", url=azure)
        d = small("azv", replicas=[replica], model_name="hosted-azv")
        monkeypatch.delenv(key_env, raising=False)
        got, message = await status_of(create(stub, d))
        assert got == grpc.StatusCode.FAILED_PRECONDITION, message
        assert "'hosted-azv/1'" in message and key_env in message
        assert "azv" not in await served_names(channel)
        monkeypatch.setenv(key_env, "sk-version-456")
        created = await create(stub, d)
        try:
            assert "sk-version-456" not in str(created)
            assert (await say_hi(channel, "azv")).text == "ok"
            assert_reached_azure(fake, "sk-version-456")
        finally:
            await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="azv"), timeout=TIMEOUT)

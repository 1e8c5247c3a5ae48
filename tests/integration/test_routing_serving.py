"""Deployments, aliases and task routes served by a real router: two local ONNX Runtime replicas
of SmolLM2, a remote replica whose server is not there, fallbacks, and what ListModels, health
and metrics say about each replica."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from router.routing.config import (
    DeploymentConfig,
    HealthCheckConfig,
    ReplicaConfig,
    RoutingConfig,
)
from router.server import RouterServer
from tests.integration.conftest import GEN, make_config
from tests.openai_servers import free_port

CHECKS = HealthCheckConfig(interval_s=0.2, timeout_s=1.0)


def routing(dead_url: str) -> RoutingConfig:
    def deployment(name: str, *replicas: ReplicaConfig, **fields: Any) -> DeploymentConfig:
        return DeploymentConfig(
            name=name, model=GEN, replicas=replicas, health_check=CHECKS, **fields
        )

    local = (ReplicaConfig(name="a"), ReplicaConfig(name="b"))
    gone = ReplicaConfig(name="gone", backend="openai_http", url=dead_url, remote_model="smollm2")
    return RoutingConfig(
        deployments=(
            deployment("chat", *local),
            deployment("sticky", *local, balancer="affinity"),
            deployment("primary", gone, fallbacks=("chat",)),
            deployment("dead", gone),
        ),
        aliases={"assistant": {"chat": 3.0, "primary": 1.0}},
        tasks={"code": "chat", "chat": "assistant"},
    )


@pytest.fixture(scope="module")
async def server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RouterServer]:
    config = make_config(
        model_cache,
        tmp_path_factory.mktemp("c"),
        ModelConfig(
            name=GEN,
            kind="generate",
            artifact=GEN,
            max_slots=2,
            max_waiting=8,
            max_context=512,
            token_budget=128,
        ),
        retrieval=False,
        routing=routing(f"http://127.0.0.1:{free_port()}"),
    )
    server = RouterServer(config)
    await server.start()
    await server.wait_ready()
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def channel(server: RouterServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


def ask(text: str = "What is 2 + 2?", **fields: object) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)]),
        sampling=pb.SamplingParams(max_tokens=6, temperature=0.0),
        cache_mode=pb.CACHE_MODE_BYPASS,
        **fields,  # type: ignore[arg-type]
    )


async def test_both_replicas_answer_the_same_greedy_text(
    stub: pb_grpc.InferenceServiceStub, server: RouterServer
) -> None:
    answers = {(await stub.Complete(ask(model="chat"))).text for _ in range(6)}
    assert len(answers) == 1 and answers != {""}
    # p2c spread the calls: each replica's engine took some (their engine ids are distinct).
    served = {r.name: r for r in server.models.replicas()}
    assert served["chat/a"].ready and served["chat/b"].ready


async def test_a_deployment_whose_replica_is_down_falls_back(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    direct = await stub.Complete(ask(model="chat"))
    routed = await stub.Complete(ask(model="primary"))
    assert routed.text == direct.text
    assert routed.model == "primary"


async def test_all_replicas_down_is_unavailable_at_once_with_retry_info(
    server: RouterServer, stub: pb_grpc.InferenceServiceStub
) -> None:
    def attempts() -> float:
        labels = {"deployment": "dead", "replica": "gone"}
        value = server.metrics.registry.get_sample_value("irouter_routing_attempts_total", labels)
        return value or 0.0

    before = attempts()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(ask(model="dead"))
    assert attempts() == before  # refused at once: no attempt on the replica out of rotation
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "no replica of deployment 'dead'" in (error.details() or "")
    assert "dead/gone" in (error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1


async def test_a_task_routes_to_its_deployment(stub: pb_grpc.InferenceServiceStub) -> None:
    answer = await stub.Complete(ask(task="code"))
    assert answer.model == "chat" and answer.text
    via_alias = await stub.Complete(ask(task="chat"))
    assert via_alias.model in ("chat", "primary") and via_alias.text
    chunks = [c async for c in stub.Generate(pb.GenerateRequest(
        task="code",
        prompt="Once upon a time",
        sampling=pb.SamplingParams(max_tokens=4, temperature=0.0),
    ))]  # fmt: skip
    assert chunks[-1].model == "chat" and chunks[-1].finish_reason


async def test_a_tools_task_on_a_deployment_of_local_replicas_makes_the_call(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    """The README's worked example: a task routed to a deployment whose replicas are the
    router's own engines enforces the tool grammar on whichever replica takes the call; a
    deployment with a remote replica refuses it by name."""
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools = [pb.Tool(name="get_weather", parameters=json.dumps(weather))]
    for _ in range(4):  # p2c: both replicas take some
        request = ask("Weather in Paris?", task="code", tools=tools)
        request.tool_choice.function = "get_weather"
        request.sampling.max_tokens = 40
        answer = await stub.Complete(request)
        assert answer.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert "city" in json.loads(answer.tool_calls[0].arguments)
    request = ask(model="dead", tools=tools)
    request.tool_choice.function = "get_weather"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Complete(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot enforce tools" in (info.value.details() or "")


async def test_an_alias_splits_across_its_deployments(stub: pb_grpc.InferenceServiceStub) -> None:
    served = set()
    for i in range(16):
        answer = await stub.Complete(ask(f"Say {i}", model="assistant"))
        served.add(answer.model)
    assert served == {"chat", "primary"}  # weights 3:1 over 16 calls: both are all but certain


async def test_a_session_header_keeps_the_caller_on_one_side(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    metadata = (("x-session-id", "user-42"),)
    served = {
        (await stub.Complete(ask(f"Say {i}", model="assistant"), metadata=metadata)).model
        for i in range(6)
    }
    assert len(served) == 1


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"task": "poetry"}, grpc.StatusCode.NOT_FOUND, "task 'poetry' has no route"),
        ({"task": "code", "model": "chat"}, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "'assistant'"),
    ],
)
async def test_bad_routes_are_named(
    stub: pb_grpc.InferenceServiceStub, fields: dict[str, str], code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Complete(ask(**fields))
    assert caught.value.code() == code
    assert needle in (caught.value.details() or "")


async def test_list_models_shows_deployments_replicas_aliases_and_tasks(
    stub: pb_grpc.InferenceServiceStub,
) -> None:
    listed = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert GEN not in listed  # served through its deployments only
    chat = listed["chat"]
    assert chat.ready and chat.serves == GEN and list(chat.tasks) == ["code"]
    assert [(r.name, r.backend, r.device, r.healthy) for r in chat.replicas] == [
        ("a", "onnxruntime", "CPU", True),
        ("b", "onnxruntime", "CPU", True),
    ]
    assert all(r.circuit_state == pb.CIRCUIT_STATE_CLOSED for r in chat.replicas)
    (gone,) = listed["dead"].replicas
    assert not gone.healthy and gone.url.startswith("http://127.0.0.1:") and gone.error
    alias = listed["assistant"]
    assert alias.backend == "alias" and list(alias.tasks) == ["chat"]
    assert {(t.deployment, t.weight) for t in alias.alias_targets} == {
        ("chat", 3.0),
        ("primary", 1.0),
    }


async def test_health_and_metrics_show_replica_state(
    channel: grpc.aio.Channel, server: RouterServer
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    state = {}
    for name in ("chat", "dead", "primary"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
        state[name] = answer.status
    assert state == {
        "chat": health_pb2.HealthCheckResponse.SERVING,
        "dead": health_pb2.HealthCheckResponse.NOT_SERVING,
        "primary": health_pb2.HealthCheckResponse.SERVING,  # through its fallback
    }
    registry = server.metrics.registry
    labels = {"deployment": "chat", "replica": "a"}
    assert registry.get_sample_value("irouter_replica_healthy", labels) == 1.0
    assert registry.get_sample_value("irouter_replica_circuit_state", labels) == 0.0
    dead = {"deployment": "dead", "replica": "gone"}
    assert registry.get_sample_value("irouter_replica_healthy", dead) == 0.0
    await _wait_for(lambda: registry.get_sample_value(
        "irouter_replica_health_checks_total", {**dead, "result": "fail"}) or 0)  # fmt: skip


async def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_openai_user_field_and_session_header_keep_a_caller_on_one_side(
    server: RouterServer,
) -> None:
    """Through the REST proxy with the official SDK: the body's `user` becomes the session key,
    so an alias split sends every call of one user to the same deployment."""
    import openai

    from tests.integration.rest_proxy import serve_proxy

    async with (
        serve_proxy(f"127.0.0.1:{server.port}") as base_url,
        openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused") as client,
    ):
        for user in ("alice", "bob ✓ not ascii"):
            served = set()
            for i in range(
                10
            ):  # a 3:1 split picked at random would show both sides 94% of the time
                answer = await client.chat.completions.create(
                    model="assistant",
                    messages=[{"role": "user", "content": f"Say {i}"}],
                    max_tokens=2,
                    temperature=0,
                    user=user,
                )
                served.add(answer.model)
            assert len(served) == 1, (user, served)
        listed = {m.id for m in (await client.models.list()).data}
        assert {"chat", "primary", "dead", "assistant"} <= listed


def attempts(server: RouterServer, deployment: str) -> dict[str, float]:
    get = server.metrics.registry.get_sample_value
    return {
        r: get("irouter_routing_attempts_total", {"deployment": deployment, "replica": r}) or 0.0
        for r in ("a", "b")
    }


async def test_p2c_spreads_calls_over_both_replicas(
    stub: pb_grpc.InferenceServiceStub, server: RouterServer
) -> None:
    before = attempts(server, "chat")
    for i in range(12):
        await stub.Complete(ask(f"Count to {i}", model="chat"))
    after = attempts(server, "chat")
    taken = {r: after[r] - before[r] for r in after}
    assert sum(taken.values()) == 12 and min(taken.values()) >= 1, taken


async def test_affinity_keeps_a_conversation_on_one_replica(
    stub: pb_grpc.InferenceServiceStub, server: RouterServer
) -> None:
    before = attempts(server, "sticky")
    opening = [pb.ChatMessage(role="user", content="Let us talk about rivers.")]
    history = list(opening)
    for i in range(6):
        request = pb.CompleteRequest(
            model="sticky",
            chat=pb.ChatMessages(messages=history),
            sampling=pb.SamplingParams(max_tokens=3, temperature=0.0),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
        answer = await stub.Complete(request)
        history += [
            pb.ChatMessage(role="assistant", content=answer.text),
            pb.ChatMessage(role="user", content=f"And river {i}?"),
        ]
    after = attempts(server, "sticky")
    taken = sorted(after[r] - before[r] for r in after)
    assert taken == [0.0, 6.0]  # every turn of the conversation on the same replica


async def test_reload_changes_weights_aliases_and_tasks_but_not_replicas(
    stub: pb_grpc.InferenceServiceStub, server: RouterServer
) -> None:
    """Runs last in this module: it changes the routing of the shared server."""
    import dataclasses

    from router.config import ConfigError

    old = server.models.routing
    chat = old.deployment("chat")
    heavier = dataclasses.replace(
        chat, replicas=(dataclasses.replace(chat.replicas[0], weight=3.0), chat.replicas[1])
    )
    new = dataclasses.replace(
        old,
        deployments=tuple(heavier if d.name == "chat" else d for d in old.deployments),
        aliases={"assistant": {"chat": 1.0}},
        tasks={"code": "sticky", "chat": "assistant"},
    ).validate()
    changes = await server.serving.reload_routing(new)
    assert any("deployment 'chat'" in c for c in changes)
    assert any("aliases" in c for c in changes) and any("tasks" in c for c in changes)
    listed = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert [(t.deployment, t.weight) for t in listed["assistant"].alias_targets] == [("chat", 1.0)]
    assert [r.weight for r in listed["chat"].replicas] == [3.0, 1.0]
    assert list(listed["sticky"].tasks) == ["code"]
    (gone,) = listed["dead"].replicas
    assert not gone.healthy  # rotation state survives a reload
    for i in range(6):
        assert (await stub.Complete(ask(f"Say {i}", model="assistant"))).model == "chat"
    assert (await stub.Complete(ask(task="code"))).model == "sticky"

    moved = dataclasses.replace(
        new,
        deployments=tuple(
            dataclasses.replace(d, replicas=(*d.replicas, ReplicaConfig(name="c")))
            if d.name == "chat"
            else d
            for d in new.deployments
        ),
    ).validate()
    with pytest.raises(ConfigError, match=r"need a restart: deployment 'chat' replicas"):
        await server.serving.reload_routing(moved)
    assert [r.name for r in server.models.routing.deployment("chat").replicas] == ["a", "b"]

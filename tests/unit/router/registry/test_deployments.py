"""Deployments' rules and rows on a real SQLite registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from router.errors import Aborted, AlreadyExists, InvalidArgument, NotFound
from router.registry import audit
from router.registry.database import open_database
from router.registry.deployments import Deployment, DeploymentStore, ReplicaSpec, validate
from router.registry.schema import deployments as table

CHAT = Deployment(name="chat", model_name="smol", model_version="1", replicas=(ReplicaSpec("r0"),))


@pytest.fixture
def store(tmp_path: Path) -> DeploymentStore:
    return DeploymentStore(open_database(f"sqlite:///{tmp_path / 'r.db'}"))


def test_validate_names_the_wrong_field() -> None:
    assert validate(CHAT) is CHAT
    remote = ReplicaSpec("r1", backend="openai_http", url="http://h:1", remote_model="m")
    assert validate(dataclasses.replace(CHAT, replicas=(ReplicaSpec("r0"), remote)))
    cases: list[tuple[dict[str, object], str]] = [
        ({"name": "Chat"}, "deployment.name"),
        ({"model_version": ""}, "deployment.model_version"),
        ({"replicas": ()}, "replicas is empty"),
        ({"replicas": (ReplicaSpec("r0"), ReplicaSpec("r0"))}, "duplicate names"),
        ({"replicas": (ReplicaSpec("R 0"),)}, r"replicas\[0\].name"),
        ({"replicas": (ReplicaSpec("r0", backend="tpu"),)}, "backend 'tpu' is unknown"),
        ({"replicas": (ReplicaSpec("r0", backend="openai_http"),)}, "give its url"),
        ({"replicas": (ReplicaSpec("r0", url="http://h:1"),)}, "takes no url"),
        ({"replicas": (ReplicaSpec("r0", device="GPU"),)}, "'onnxruntime' runs on the CPU"),
        ({"replicas": (ReplicaSpec("r0", weight=0.0),)}, "weight=0.0 must be > 0"),
        ({"replicas": (dataclasses.replace(remote, dialect="tgi"),)}, r"replicas\[0\].dialect"),
        ({"replicas": (dataclasses.replace(remote, dialect="azure"),)}, r"\].api_version"),
        ({"replicas": (dataclasses.replace(remote, api_key_env="A-B"),)}, r"\].api_key_env"),
        ({"threads": 0}, r"threads=0 must be in \[1, 256\]"),
        ({"max_slots": 1000}, "max_slots=1000"),
        ({"prefill_graph": "fp8"}, "prefill_graph 'fp8' is unknown"),
        ({"replicas": (remote,), "prefill_graph": "model"}, "applies to onnxruntime replicas"),
        ({"decode_kernel": "gpu"}, "decode_kernel 'gpu' is unknown"),
        ({"replicas": (remote,), "decode_kernel": "native"}, "decode_kernel 'native' applies"),
    ]
    for fields, words in cases:
        with pytest.raises(InvalidArgument, match=words):
            validate(dataclasses.replace(CHAT, **fields))  # type: ignore[arg-type]


def test_rows_round_trip_with_generations_and_audit(store: DeploymentStore) -> None:
    stored = store.insert(CHAT, "alice@t")
    assert (stored.generation, stored.created_by) == (1, "alice@t")
    assert store.get("chat") == stored and store.all() == [stored]
    with pytest.raises(AlreadyExists):
        store.insert(CHAT, "bob@t")
    assert store.using("smol", "1") == ["chat"] and store.using("smol", "2") == []
    two = dataclasses.replace(stored, replicas=(ReplicaSpec("r0"), ReplicaSpec("r1")))
    scaled = store.replace(stored, two, "bob@t", "deployment.scale")
    assert scaled.generation == 2 and store.get("chat").replicas == two.replicas
    with pytest.raises(Aborted, match="past generation 1"):
        store.replace(stored, two, "carol@t", "deployment.scale")  # read before bob's change
    store.delete("chat", "dave@t")
    with pytest.raises(NotFound):
        store.get("chat")
    actions = [(e.action, e.actor) for e in audit.events(store.engine, target="deployment/chat")]
    assert actions == [
        ("deployment.create", "alice@t"),
        ("deployment.scale", "bob@t"),
        ("deployment.delete", "dave@t"),
    ]


def test_the_prompt_graph_and_decode_kernel_are_stored_and_older_rows_read_auto(
    store: DeploymentStore,
) -> None:
    chosen = dataclasses.replace(CHAT, prefill_graph="model", decode_kernel="onnxruntime")
    stored = store.insert(chosen, "alice@t")
    got = store.get("chat")
    assert (got.prefill_graph, got.decode_kernel) == ("model", "onnxruntime")
    with store.engine.begin() as conn:  # a row from before the fields: its spec lacks the keys
        spec = json.loads(conn.execute(sa.select(table.c.spec)).scalar_one())
        del spec["prefill_graph"], spec["decode_kernel"]
        conn.execute(sa.update(table).values(spec=json.dumps(spec)))
    assert store.get("chat") == dataclasses.replace(
        stored, prefill_graph="auto", decode_kernel="auto"
    )

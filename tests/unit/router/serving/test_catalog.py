"""The Catalog without loading anything: what a call's model name resolves to, and the
refusals a client sees (empty, unknown, wrong kind, not ready yet), each naming what is served."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ModelConfig
from router.errors import InvalidArgument, NotFound, Unavailable
from router.routing.config import DeploymentConfig, ReplicaConfig, RoutingConfig
from router.serving.catalog import Catalog
from router.telemetry import Metrics

GEN, EMB = "smol", "mini"


def make_catalog(routing: RoutingConfig | None = None) -> Catalog:
    configs = (
        ModelConfig(name=GEN, kind="generate", artifact="a"),
        ModelConfig(name=EMB, kind="embed", artifact="b"),
    )
    return Catalog(configs, Path("/nonexistent"), Metrics(), routing)


def ready(catalog: Catalog) -> Catalog:
    for model in catalog:
        model.ready = True
    return catalog


def test_models_are_listed_before_they_load_and_refused_until_ready() -> None:
    catalog = make_catalog()
    assert sorted(m.name for m in catalog) == [EMB, GEN]
    with pytest.raises(Unavailable, match=f"model '{GEN}' is not ready .still loading."):
        catalog.get(GEN, "generate")
    next(m for m in catalog if m.name == GEN).error = "no such file"
    with pytest.raises(Unavailable, match="not ready: no such file"):
        catalog.get(GEN, "generate")


def test_a_ready_model_is_found_by_name_and_kind() -> None:
    catalog = ready(make_catalog())
    assert catalog.get(GEN, "generate").name == GEN
    assert catalog.get(EMB, "embed").name == EMB


@pytest.mark.parametrize(
    ("name", "kind", "error", "message"),
    [
        ("", "generate", InvalidArgument, "model is empty; generation models served: ['smol']"),
        ("gpt-4", "generate", NotFound, "model 'gpt-4' is not served; generation models"),
        (GEN, "embed", NotFound, "embedding models served: ['mini']"),
    ],
)
def test_a_wrong_name_is_refused_naming_what_is_served(
    name: str, kind: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        ready(make_catalog()).get(name, kind)


def test_a_deployment_hides_its_model_and_an_alias_resolves_to_it() -> None:
    routing = RoutingConfig(
        deployments=(
            DeploymentConfig(name="chat", model=GEN, replicas=(ReplicaConfig(name="r0"),)),
        ),
        aliases={"assistant": {"chat": 1.0}},
    )
    catalog = ready(make_catalog(routing))
    assert sorted(m.name for m in catalog) == ["chat", EMB]  # the model behind is not served
    assert [r.name for r in catalog.replicas()] == ["chat/r0"]
    assert catalog.get("assistant", "generate").name == "chat"
    with pytest.raises(NotFound, match="served: \\['assistant', 'chat'\\]"):
        catalog.get(GEN, "generate")


def test_engine_ids_are_unique() -> None:
    catalog = make_catalog()
    ids = [catalog.next_engine_id() for _ in range(100)]
    assert len(set(ids)) == 100

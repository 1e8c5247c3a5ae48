"""A version registered with only a remote artifact, as the models[] entry its deployment
serves: the server's dialect, API version and API key (read from the router's environment),
which the deployment's replicas inherit unless they name their own."""

from __future__ import annotations

import pytest

from backends.factory import OpenAIHttpConfig
from router.config import replica_model
from router.control.served_config import model_config, replica_config
from router.errors import FailedPrecondition
from router.registry.artifacts import Artifact, CheckedArtifact
from router.registry.deployments import Deployment, ReplicaSpec
from router.registry.model_versions import ModelVersion

AZURE_URL = "https://res.openai.azure.com/openai/deployments/gpt-4o"
KEY_ENV = "IROUTER_TEST_SERVED_AZURE_KEY"


def remote_version(kind: str = "generate", **server: str) -> ModelVersion:
    artifact = Artifact("remote", AZURE_URL, "openai_http", "gpt-4o", **server)
    checked = CheckedArtifact(artifact, "remote", kind, "", 0, 0)
    return ModelVersion("gpt", "1", kind, checked, context_length=8192)


def deployment(*replicas: ReplicaSpec) -> Deployment:
    return Deployment(
        "chat", "gpt", "1", replicas or (ReplicaSpec("r0", "openai_http", url=AZURE_URL),)
    )


AZURE = {
    "remote_dialect": "azure",
    "remote_api_version": "2024-10-21",
    "remote_api_key_env": KEY_ENV,
}


@pytest.mark.parametrize("kind", ["generate", "embed"])
def test_an_azure_version_is_served_with_its_api_version_and_key(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-azure")
    model = model_config(remote_version(kind, **AZURE), deployment())
    assert model.remote is not None
    assert (model.remote.dialect, model.remote.api_version) == ("azure", "2024-10-21")
    assert model.remote.api_key == "sk-azure" and model.remote.headers() == {"api-key": "sk-azure"}
    assert model.remote.endpoint("/chat/completions") == (
        f"{AZURE_URL}/chat/completions?api-version=2024-10-21"
    )


def test_a_version_without_server_fields_is_an_openai_server_without_a_key() -> None:
    model = model_config(remote_version(), deployment())
    assert model.remote == OpenAIHttpConfig(url=AZURE_URL, model="gpt-4o", context_length=2048)


def test_replicas_inherit_the_versions_server_unless_they_name_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-azure")
    monkeypatch.setenv(f"{KEY_ENV}_2", "sk-other")
    other = "https://other.openai.azure.com/openai/deployments/gpt-4o"
    inherits = ReplicaSpec("r0", "openai_http", url=AZURE_URL)
    own = ReplicaSpec(
        "r1",
        "openai_http",
        url=other,
        dialect="azure",
        api_key_env=f"{KEY_ENV}_2",
        api_version="2025-01-01",
    )
    model = model_config(remote_version(**AZURE), deployment(inherits, own))
    served = replica_model(model, "chat", replica_config(inherits)).remote
    assert served is not None
    assert (served.dialect, served.api_version, served.api_key) == (
        "azure",
        "2024-10-21",
        "sk-azure",
    )
    served = replica_model(model, "chat", replica_config(own)).remote
    assert served is not None
    assert (served.url, served.api_version, served.api_key) == (other, "2025-01-01", "sk-other")
    # Another kind of server behind an azure version: no api_version of the version's.
    vllm = ReplicaSpec("r2", "openai_http", url="http://10.0.0.7:8000", dialect="vllm")
    served = replica_model(model, "chat", replica_config(vllm)).remote
    assert served is not None
    assert (served.dialect, served.api_version) == ("vllm", "")
    served.validate()


def test_a_key_variable_this_router_lacks_is_a_failed_precondition_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(FailedPrecondition) as info:
        model_config(remote_version(**AZURE), deployment())
    message = str(info.value)
    assert "model version 'gpt/1'" in message and KEY_ENV in message
    assert "not set on this router" in message

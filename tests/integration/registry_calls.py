"""ModelService calls the registry's integration tests share (SQLite and PostgreSQL alike)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from router.config import ModelConfig
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import model_service_pb2 as pb
from router.proto.irouter.v1 import model_service_pb2_grpc as pb_grpc
from tests.integration.conftest import EMB

EMBEDDER = ModelConfig(name=EMB, kind="embed", artifact=EMB)
"""The one model the routers here load: the registry needs none, a router at least one."""
TIMEOUT = 120.0
"""Deadline of every call: checking the SmolLM2 GGUF takes seconds on a small machine."""
EMBED = inference_pb.MODEL_KIND_EMBED


def minilm(name: str, version: str = "1", **fields: Any) -> pb.ModelVersion:
    """A version of the packaged MiniLM (embed): cheap to check, unlike the SmolLM2 GGUF."""
    fields.setdefault("kind", EMBED)
    fields.setdefault("artifact", pb.Artifact(package=EMB))
    return pb.ModelVersion(name=name, version=version, **fields)


AZURE = pb.RemoteArtifact(
    backend="openai_http",
    url="https://res.openai.azure.com/openai/deployments/gpt-4o",
    dialect="azure",
    api_version="2024-10-21",
    api_key_env="IROUTER_TEST_UNSET_AZURE_KEY",
)
"""An Azure OpenAI deployment as a remote artifact names it; its key's variable is set nowhere
(registering needs no key, only deploying does)."""


def remote_version(
    name: str, version: str = "1", server: pb.RemoteArtifact = AZURE, **fields: Any
) -> pb.ModelVersion:
    """A generation version with only a remote artifact, `server` (8,192 tokens)."""
    fields.setdefault("kind", inference_pb.MODEL_KIND_GENERATE)
    fields.setdefault("context_length", 8192)
    return pb.ModelVersion(
        name=name, version=version, artifact=pb.Artifact(remote=server), **fields
    )


async def register(
    stub: pb_grpc.ModelServiceStub,
    version: pb.ModelVersion,
    metadata: Any = None,
    timeout: float = TIMEOUT,
) -> pb.ModelVersion:
    request = pb.RegisterModelVersionRequest(model_version=version)
    response = await stub.RegisterModelVersion(request, timeout=timeout, metadata=metadata)
    return response.model_version


async def get(stub: pb_grpc.ModelServiceStub, name: str, version: str) -> pb.ModelVersion:
    request = pb.GetModelVersionRequest(name=name, version=version)
    return (await stub.GetModelVersion(request, timeout=TIMEOUT)).model_version


async def update(
    stub: pb_grpc.ModelServiceStub,
    version: pb.ModelVersion,
    *paths: str,
    expected_generation: int = 0,
) -> pb.ModelVersion:
    request = pb.UpdateModelVersionRequest(
        model_version=version,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        expected_generation=expected_generation,
    )
    return (await stub.UpdateModelVersion(request, timeout=TIMEOUT)).model_version


async def listed(stub: pb_grpc.ModelServiceStub, **filters: Any) -> list[tuple[str, str]]:
    """(name, version) of every version the filters select, walking every page."""
    found: list[tuple[str, str]] = []
    token = ""
    while True:
        request = pb.ListModelVersionsRequest(page_token=token, **filters)
        page = await stub.ListModelVersions(request, timeout=TIMEOUT)
        found += [(v.name, v.version) for v in page.model_versions]
        token = page.next_page_token
        if not token:
            return found


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call ends with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""

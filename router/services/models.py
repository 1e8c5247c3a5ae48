"""ModelService: proto ↔ domain translation only. The registry's rules and storage live in
router.registry; every statement and artifact check runs on a worker thread, never on the event
loop the data plane shares: statements on the registry's own threads with a time bound
(router.registry.database.call), artifact checks on a worker thread."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import grpc

from router.errors import InvalidArgument
from router.guard.identity import ANONYMOUS_SUBJECT, get_identity
from router.proto.irouter.v1 import inference_service_pb2 as inference_pb
from router.proto.irouter.v1 import model_service_pb2 as pb
from router.registry.artifacts import Artifact, CheckedArtifact, check_artifact
from router.registry.database import call
from router.registry.model_versions import (
    ACTIVE,
    UPDATABLE,
    ModelVersion,
    check_name,
    check_version,
    parse_price,
    price_text,
    validate_draft,
)
from router.registry.version_store import ModelVersionStore

Context = grpc.aio.ServicerContext[Any, Any]

KINDS = {inference_pb.MODEL_KIND_GENERATE: "generate", inference_pb.MODEL_KIND_EMBED: "embed"}
KINDS_PB = {name: kind for kind, name in KINDS.items()}
_STATES_PB = {
    ACTIVE: pb.MODEL_VERSION_STATE_ACTIVE,
    "deprecated": pb.MODEL_VERSION_STATE_DEPRECATED,
}


def actor() -> str:
    """Who is changing the registry: the caller's subject and tenant, or 'anonymous'."""
    identity = get_identity()
    if identity is None:
        return ANONYMOUS_SUBJECT
    return f"{identity.subject}@{identity.tenant}"


def _kind(value: int, field: str) -> str:
    kind: str | None = KINDS.get(value)  # type: ignore[call-overload]
    if kind is None:
        raise InvalidArgument(f"{field} is required: MODEL_KIND_GENERATE or MODEL_KIND_EMBED")
    return kind


def artifact_from_pb(message: pb.Artifact) -> Artifact:
    source = message.WhichOneof("source")
    if source is None:
        raise InvalidArgument(
            "model_version.artifact is required: set one of package, path or remote"
        )
    if source == "remote":
        r = message.remote
        return Artifact(
            "remote",
            r.url,
            remote_backend=r.backend,
            remote_model=r.model,
            remote_dialect=r.dialect,
            remote_api_version=r.api_version,
            remote_api_key_env=r.api_key_env,
        )
    return Artifact(source, getattr(message, source))


def artifact_pb(checked: CheckedArtifact) -> pb.Artifact:
    a = checked.artifact
    if a.source == "remote":
        remote = pb.RemoteArtifact(
            backend=a.remote_backend,
            url=a.location,
            model=a.remote_model,
            dialect=a.remote_dialect,
            api_version=a.remote_api_version,
            api_key_env=a.remote_api_key_env,
        )
        return pb.Artifact(remote=remote)
    if a.source == "package":
        return pb.Artifact(package=a.location)
    return pb.Artifact(path=a.location)


def version_pb(v: ModelVersion) -> pb.ModelVersion:
    message = pb.ModelVersion(
        name=v.name,
        version=v.version,
        description=v.description,
        kind=KINDS_PB[v.kind],
        artifact=artifact_pb(v.artifact),
        input_schema=v.input_schema,
        output_schema=v.output_schema,
        context_length=v.context_length,
        input_price_per_1k=price_text(v.input_price_per_1k),
        output_price_per_1k=price_text(v.output_price_per_1k),
        currency=v.currency,
        tags=list(v.tags),
        state=_STATES_PB[v.state],
        deprecation_reason=v.deprecation_reason,
        artifact_format=v.artifact.format,
        artifact_sha256=v.artifact.sha256,
        artifact_size_bytes=v.artifact.size_bytes,
        created_by=v.created_by,
        generation=v.generation,
    )
    message.create_time.FromNanoseconds(int(v.created_at * 1e9))
    message.update_time.FromNanoseconds(int(v.updated_at * 1e9))
    return message


def _prices(m: pb.ModelVersion) -> tuple[Decimal, Decimal]:
    return (
        parse_price(m.input_price_per_1k, "model_version.input_price_per_1k"),
        parse_price(m.output_price_per_1k, "model_version.output_price_per_1k"),
    )


class ModelServicer:
    """The registry's model versions over gRPC (and REST, transcoded)."""

    def __init__(self, store: ModelVersionStore) -> None:
        self._store = store

    async def RegisterModelVersion(
        self, request: pb.RegisterModelVersionRequest, context: Context
    ) -> pb.RegisterModelVersionResponse:
        m = request.model_version
        check_name(m.name, "model_version.name")
        check_version(m.version, "model_version.version")
        kind = _kind(m.kind, "model_version.kind")
        artifact = artifact_from_pb(m.artifact)
        input_price, output_price = _prices(m)
        # Checking may hash a GGUF of hundreds of MB: on a worker thread, like the statements.
        checked = await asyncio.to_thread(check_artifact, artifact, kind)
        draft = validate_draft(
            ModelVersion(
                name=m.name,
                version=m.version,
                kind=kind,
                artifact=checked,
                context_length=m.context_length,
                description=m.description,
                input_schema=m.input_schema,
                output_schema=m.output_schema,
                input_price_per_1k=input_price,
                output_price_per_1k=output_price,
                currency=m.currency or "USD",
                tags=tuple(m.tags),
            )
        )
        stored = await call(self._store.register, draft, actor())
        return pb.RegisterModelVersionResponse(model_version=version_pb(stored))

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: Context
    ) -> pb.GetModelVersionResponse:
        check_name(request.name)
        check_version(request.version)
        found = await call(self._store.get, request.name, request.version)
        return pb.GetModelVersionResponse(model_version=version_pb(found))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        if request.name:
            check_name(request.name)
        kind = "" if not request.kind else _kind(request.kind, "kind")
        versions, token = await call(
            lambda: self._store.list(
                name=request.name,
                kind=kind,
                tag=request.tag,
                include_deprecated=request.include_deprecated,
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return pb.ListModelVersionsResponse(
            model_versions=[version_pb(v) for v in versions], next_page_token=token
        )

    async def UpdateModelVersion(
        self, request: pb.UpdateModelVersionRequest, context: Context
    ) -> pb.UpdateModelVersionResponse:
        m = request.model_version
        check_name(m.name, "model_version.name")
        check_version(m.version, "model_version.version")
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument(
                f"update_mask is empty: name the fields to change, of {UPDATABLE}"
            )
        changes: dict[str, Any] = {}
        for path in paths:
            if path not in UPDATABLE:
                raise InvalidArgument(
                    f"update_mask path {path!r} cannot change; updatable: {list(UPDATABLE)} "
                    "(register a new version to change the artifact, kind or context limit)"
                )
            if path.endswith("_price_per_1k"):
                changes[path] = parse_price(getattr(m, path), f"model_version.{path}")
            elif path == "tags":
                changes[path] = tuple(m.tags)
            elif path == "currency":
                changes[path] = m.currency or "USD"
            else:
                changes[path] = getattr(m, path)
        updated = await call(
            lambda: self._store.update(
                m.name,
                m.version,
                changes,
                actor(),
                expected_generation=request.expected_generation,
            )
        )
        return pb.UpdateModelVersionResponse(model_version=version_pb(updated))

    async def DeprecateModelVersion(
        self, request: pb.DeprecateModelVersionRequest, context: Context
    ) -> pb.DeprecateModelVersionResponse:
        check_name(request.name)
        check_version(request.version)
        done = await call(
            self._store.deprecate, request.name, request.version, request.reason, actor()
        )
        return pb.DeprecateModelVersionResponse(model_version=version_pb(done))

    async def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: Context
    ) -> pb.DeleteModelVersionResponse:
        check_name(request.name)
        check_version(request.version)
        await call(self._store.delete, request.name, request.version, actor())
        return pb.DeleteModelVersionResponse()

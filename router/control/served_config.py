"""What a deployment serves, as the router's own configuration: a registered version and its
deployment's settings become a models[] entry (refused by name when the version cannot be
deployed), its replicas the routing section's."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from backends.factory import OpenAIHttpConfig
from router.config import ConfigError, ModelConfig, replica_secret
from router.errors import FailedPrecondition, InvalidArgument, quote
from router.models import prepare
from router.registry.deployments import Deployment, ReplicaSpec
from router.registry.model_versions import DEPRECATED, ModelVersion
from router.routing.config import DeploymentConfig, ReplicaConfig

DEFAULT_CONTEXT = 2048
"""max_context of a deployment that leaves it 0, when the version allows that much."""


def model_config(version: ModelVersion, d: Deployment) -> ModelConfig:
    """The models[] entry a deployment of `version` serves, or FailedPrecondition naming why
    the version cannot be deployed (yet)."""
    where = f"model version {quote(version.key)}"
    if version.state == DEPRECATED:
        raise FailedPrecondition(
            f"{where} is deprecated ({version.deprecation_reason or 'no reason given'}); "
            "deploy an active version"
        )
    artifact = version.artifact
    remote = artifact.artifact.source == "remote"
    if remote and artifact.artifact.remote_backend != "openai_http":
        raise FailedPrecondition(
            f"{where} has only a remote {artifact.artifact.remote_backend} artifact: a KServe "
            "model needs its tokenizer and chat template here. Register a version with a local "
            "artifact and give its replicas the server's url"
        )
    if version.kind == "embed":
        return _embedder_config(version, d)
    limit = version.context_length
    max_context = d.max_context or min(DEFAULT_CONTEXT, limit)
    if max_context > limit:
        raise InvalidArgument(
            f"deployment.max_context={max_context} is above the context limit of {where} ({limit})",
            field="deployment.max_context",
        )
    if max_context < 2:
        raise InvalidArgument("deployment.max_context must be at least 2", field="max_context")
    location = artifact_folder(version)
    if remote:
        # No artifact: the server renders chats and counts tokens (router.serving.passthrough).
        # Its replicas are the version's server unless they name their own.
        return ModelConfig(
            name=d.name,
            kind="generate",
            backend="openai_http",
            remote=_remote(version, max_context),
            max_context=max_context,
            max_slots=d.max_slots,
            default_max_tokens=min(256, max_context - 1),
        )
    return ModelConfig(
        name=d.name,
        kind="generate",
        artifact=location,
        threads=d.threads,
        max_context=max_context,
        max_slots=d.max_slots,
        prefix_cache_mb=d.prefix_cache_mb,
        prefill_graph=d.prefill_graph,
        decode_kernel=d.decode_kernel,
        default_max_tokens=min(256, max_context - 1),
    )


def _remote(version: ModelVersion, context: int) -> OpenAIHttpConfig:
    """The server of a version registered with only a remote artifact (its replicas' unless they
    name their own): its dialect, API version and API key, read from this router's environment
    (FailedPrecondition naming the version and the variable when it is not set, before
    anything is loaded)."""
    artifact = version.artifact.artifact
    api_key = None
    if artifact.remote_api_key_env:
        where = f"model version {quote(version.key)}: its remote artifact's"
        api_key = _secret(artifact.remote_api_key_env, where)
    return OpenAIHttpConfig(
        url=artifact.location.rstrip("/").removesuffix("/v1"),  # the dialect adds its prefix
        model=artifact.remote_model or version.name,
        dialect=artifact.remote_dialect or "openai",
        api_version=artifact.remote_api_version,
        api_key=api_key,
        context_length=context,
    )


def artifact_folder(version: ModelVersion) -> str:
    """The folder under the model cache a local replica loads: a package's name, a prepared
    folder's absolute path, or the folder a GGUF file is prepared into, named by its digest
    (prepared when it is first deployed: `prepare_gguf`); a remote version's url."""
    checked = version.artifact
    if needs_preparing(version):
        return f"gguf-{checked.sha256[:16]}"
    return checked.artifact.location


def needs_preparing(version: ModelVersion) -> bool:
    """Whether the version is a GGUF file, which replicas load prepared (ONNX, int4)."""
    return version.artifact.format == "gguf" and version.artifact.artifact.source == "path"


def prepare_gguf(version: ModelVersion, model_cache: Path) -> None:
    """Prepare a GGUF version's folder (`artifact_folder`) unless it is there already; blocking
    (~20 s for a 135M model on two cores): run it on a worker thread. FailedPrecondition names
    what the preparation could not do."""
    try:
        prepare.prepare_decoders(
            model_cache,
            gguf_path=Path(version.artifact.artifact.location),
            name=artifact_folder(version),
            progress=False,
        )
    except Exception as exc:  # whatever a file that passed registration's checks still fails
        raise FailedPrecondition(
            f"model version {quote(version.key)}: its GGUF could not be prepared for serving "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _embedder_config(version: ModelVersion, d: Deployment) -> ModelConfig:
    """The models[] entry of an embedding deployment: the encoder's own window unless
    max_context is smaller; the decoders' settings (slots, prefix cache) refused by name."""
    defaults = {f.name: f.default for f in dataclasses.fields(Deployment)}
    for key in ("max_slots", "prefix_cache_mb", "prefill_graph", "decode_kernel"):
        if getattr(d, key) not in (defaults[key], 0):
            raise InvalidArgument(
                f"deployment.{key}={getattr(d, key)} applies to generation models; "
                f"{quote(version.key)} embeds (leave it unset)",
                field=f"deployment.{key}",
            )
    limit = version.context_length
    if d.max_context > limit:
        raise InvalidArgument(
            f"deployment.max_context={d.max_context} is above the window of model version "
            f"{quote(version.key)} ({limit} tokens)",
            field="deployment.max_context",
        )
    artifact = version.artifact.artifact
    window = d.max_context or limit
    if artifact.source == "remote":
        return ModelConfig(
            name=d.name,
            kind="embed",
            backend="openai_http",
            remote=_remote(version, window),
            max_context=window,
        )
    return ModelConfig(
        name=d.name, kind="embed", artifact=artifact.location, threads=d.threads, max_context=window
    )


def replica_config(r: ReplicaSpec) -> ReplicaConfig:
    return ReplicaConfig(
        name=r.name,
        backend=r.backend,
        device=r.device,
        url=r.url,
        weight=r.weight,
        remote_model=r.remote_model,
        dialect=r.dialect,
        api_key_env=r.api_key_env,
        api_version=r.api_version,
    )


def check_secrets(replicas: Iterable[ReplicaSpec]) -> None:
    """FailedPrecondition naming the first replica whose API key's environment variable this
    router does not have (nothing is loaded then)."""
    for r in replicas:
        if r.api_key_env:
            _secret(r.api_key_env, f"replica {quote(r.name)}:")


def _secret(variable: str, where: str) -> str:
    """The API key in environment variable `variable`, or FailedPrecondition naming `where`
    and the variable (nothing is loaded then)."""
    try:
        return replica_secret(variable)
    except ConfigError as exc:
        raise FailedPrecondition(f"{where} {exc}") from None


def routing_config(d: Deployment) -> DeploymentConfig:
    return DeploymentConfig(name=d.name, replicas=tuple(replica_config(r) for r in d.replicas))

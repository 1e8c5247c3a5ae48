"""Typed configuration: one frozen dataclass per section, each validated with messages that name
the key and the fix; `RouterConfig()` is the built-in default that serves real models with no
file and no flags. Reading a file and the environment is config_file.py (the one place that
reads IROUTER_ variables)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import BACKEND_KINDS, DECODE_KERNELS, PRECISIONS, PREFILL_GRAPHS
from backends.factory import KServeConfig, OpenAIHttpConfig
from router import logs
from router.cache.config import CacheConfig
from router.guard.config import GuardConfig
from router.registry.config import RegistryConfig
from router.retrieval.config import RagConfig
from router.routing.config import RoutingConfig
from router.tls import TlsConfig

ENV_PREFIX = "IROUTER_"
MODEL_KINDS = ("generate", "embed")
REMOTE_BACKENDS = ("openai_http", "kserve_grpc")
"""Backends reached at a URL; the others run in the router's process on a device."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address the gRPC server binds."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9464
    """Prometheus HTTP port; 0 disables metrics over HTTP. Worker i of N serves on port + i."""
    workers: int = 1
    """Processes sharing the port (SO_REUSEPORT); one aio process saturates ~1.35 cores."""
    grace_seconds: float = 10.0
    """On SIGTERM/SIGINT, in-flight calls get this long to finish before they are cancelled."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request message accepted; larger ones get RESOURCE_EXHAUSTED."""
    log_level: str = "INFO"
    """Level of the router's own loggers (router.*, backends.*)."""
    library_log_level: str = "WARNING"
    """Level of every other library's loggers (httpx, grpc, uvicorn...): WARNING keeps httpx's
    line per upstream request out of the log."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """TLS / mutual TLS on the gRPC port (certificates reload when their files change)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    """Name clients use in requests."""
    kind: str
    """'generate' (decoder) or 'embed' (encoder)."""
    artifact: str = ""
    """Folder under model_cache prepared by `irouter models prepare`. Empty only with backend
    'openai_http': the model is then served with no local artifact (`passthrough`)."""
    backend: str = "onnxruntime"
    """Backend kind (see backends.base.create_backend): 'onnxruntime', 'openvino' or
    'tensorrt_llm' (CUDA hosts with TensorRT-LLM installed; unverified on hardware)."""
    device: str = "CPU"
    """OpenVINO device: CPU, GPU, GPU.1, NPU, AUTO, HETERO:GPU,CPU (must be present here)."""
    precision: str = ""
    """OpenVINO inference precision: '' (device default), 'f32' (exact), 'bf16' or 'f16'."""
    prefill_graph: str = "auto"
    """ONNX Runtime decoders: the graph that computes prompts: 'int8' (the int4 decoder's int8
    graph), 'model' (the decoder's own) or 'auto' (int8 on CPUs with VNNI or AMX)."""
    decode_kernel: str = "auto"
    """ONNX Runtime decoders' decode steps: one of backends.base.DECODE_KERNELS (documented)."""
    engine_path: str = ""
    """TensorRT-LLM: the model given to tensorrt_llm.LLM (HF checkpoint or engine folder; empty:
    the artifact folder). The artifact still supplies the tokenizer and chat template."""
    remote: OpenAIHttpConfig | None = None
    """openai_http: the OpenAI-compatible server (url, model, dialect, timeouts, ...). With an
    artifact, it supplies the tokenizer and chat template: the router renders the prompt
    (generation), or validates and counts the texts it sends to /v1/embeddings (embedding).
    With none, the server renders chats itself and token counts are the server's (or estimated:
    router.serving.passthrough)."""
    kserve: KServeConfig | None = None
    """kserve_grpc: the KServe v2 gRPC server (url 'host:port', model, tensor names, stream,
    timeouts). The artifact still supplies the tokenizer and chat template."""
    threads: int = 2
    """Intra-op threads of the backend."""
    max_context: int = 2048
    """Prompt plus completion tokens per sequence (decoders); capped by the model's own limit."""
    max_slots: int = 16
    """Sequences decoded together; each holds a KV slot of max_context tokens (decoders)."""
    token_budget: int = 512
    """Most tokens computed per engine step: decode rows cost 1, prefill chunks their length.
    While sequences decode, the router's own engine gives a step less (router.scheduler.pacing),
    so that a long prefill chunk does not stall every stream's next token."""
    max_waiting: int = 256
    """Requests queued beyond the running ones before new ones are shed (RESOURCE_EXHAUSTED)."""
    max_queue_wait_s: float = 10.0
    """The bound on a call's wait for its first token: a call that could expect to wait longer
    for a slot than this less the model's measured slot-to-first-token time (from its rate under
    full load; until 16 first tokens are measured, half the bound) is shed at once with a
    RetryInfo of when to come back, and an admitted call that still has no slot then leaves the
    same way; 0 turns the bound off, leaving max_waiting alone."""
    prefix_cache_mb: int = 128
    """KV kept for prefix caching (decoders the router batches, e.g. ONNX Runtime; with
    backend 'openvino', extra blocks for GenAI's own prefix caching): requests sharing a prefix
    (system prompt, earlier turns) reuse its KV instead of computing it; 0 turns it off.
    Allocated at start, so resident memory does not grow past it."""
    default_max_tokens: int = 256
    """max_tokens when a request leaves it unset (decoders)."""
    max_batch: int = 32
    """Texts per encoder batch and per Embed call (encoders)."""
    max_delay_ms: float = 2.0
    """How long the encoder batcher waits to fill a batch after the first text arrives."""

    @property
    def passthrough(self) -> bool:
        """Served with no local artifact: a remote server's chat template, tool-call parser and
        token counts stand (router.serving.passthrough)."""
        return not self.artifact

    def validate(self) -> None:
        where = f"models[{self.name!r}]"
        if not self.name:
            raise ConfigError("models[].name must not be empty")
        if not self.artifact and self.backend != "openai_http":
            raise ConfigError(
                f"{where}.artifact is empty: backend {self.backend!r} serves a prepared artifact "
                "(see `irouter models prepare`); only backend 'openai_http' serves with none"
            )
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"{where}.kind={self.kind!r} is unknown; use one of {MODEL_KINDS}")
        if self.backend not in BACKEND_KINDS:
            raise ConfigError(
                f"{where}.backend={self.backend!r} is unknown; use one of {BACKEND_KINDS}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"{where}.precision={self.precision!r} is unknown; use one of {list(PRECISIONS)}"
            )
        if not self.device:
            raise ConfigError(f"{where}.device is empty; use e.g. 'CPU', 'GPU' or 'AUTO'")
        if self.remote is not None and self.backend != "openai_http":
            raise ConfigError(
                f"{where}.remote applies to backend 'openai_http' only, not {self.backend!r}"
            )
        if self.remote is not None:
            try:
                self.remote.validate()
            except ValueError as exc:
                raise ConfigError(f"{where}.remote: {exc}") from None
        if self.kserve is not None and self.backend != "kserve_grpc":
            raise ConfigError(
                f"{where}.kserve applies to backend 'kserve_grpc' only, not {self.backend!r}"
            )
        if self.kserve is not None:
            if self.kind != "generate":
                raise ConfigError(f"{where}: backend 'kserve_grpc' serves generation models only")
            try:
                self.kserve.validate()
            except ValueError as exc:
                raise ConfigError(f"{where}.kserve: {exc}") from None
        if self.engine_path and self.backend != "tensorrt_llm":
            raise ConfigError(f"{where}.engine_path applies to backend 'tensorrt_llm' only")
        if self.backend == "tensorrt_llm" and (
            self.precision or not (self.device == "CPU" or self.device.startswith("cuda"))
        ):
            raise ConfigError(
                f"{where}.device={self.device!r} / precision={self.precision!r}: backend "
                "'tensorrt_llm' runs on CUDA ('cuda' or 'cuda:N') at its engine's precision"
            )
        if self.backend == "onnxruntime" and (self.device != "CPU" or self.precision):
            raise ConfigError(
                f"{where}.device={self.device!r} / precision={self.precision!r}: these apply to "
                "backend 'openvino'; backend 'onnxruntime' runs on CPU at the model's precision"
            )
        onnx_decoder = self.backend == "onnxruntime" and self.kind == "generate"
        for key, known in (("prefill_graph", PREFILL_GRAPHS), ("decode_kernel", DECODE_KERNELS)):
            value = getattr(self, key)
            if value not in known or (value != "auto" and not onnx_decoder):
                raise ConfigError(
                    f"{where}.{key}={value!r}: use one of {list(known)}, for generation models "
                    "on backend 'onnxruntime' only"
                )
        for key in ("threads", "max_context", "max_slots", "token_budget", "max_batch"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"{where}.{key}={value} must be at least 1")
        if not self.max_queue_wait_s >= 0:
            raise ConfigError(
                f"{where}.max_queue_wait_s={self.max_queue_wait_s} must be >= 0 (0 turns it off)"
            )
        if self.max_waiting < 0:
            raise ConfigError(f"{where}.max_waiting={self.max_waiting} must not be negative")
        if self.prefix_cache_mb < 0:
            raise ConfigError(
                f"{where}.prefix_cache_mb={self.prefix_cache_mb} must be >= 0 (0 turns it off)"
            )
        if self.kind == "generate" and not 1 <= self.default_max_tokens < self.max_context:
            raise ConfigError(
                f"{where}.default_max_tokens={self.default_max_tokens} must be in "
                f"[1, max_context={self.max_context})"
            )
        if self.max_delay_ms < 0:
            raise ConfigError(f"{where}.max_delay_ms={self.max_delay_ms} must not be negative")

    def check_endpoint(self) -> None:
        """For a model served under its own name (not only behind deployments, whose replicas
        give their own urls): a remote backend's section must say where the server is."""
        where = f"models[{self.name!r}]"
        sections = {"openai_http": ("remote", self.remote), "kserve_grpc": ("kserve", self.kserve)}
        if self.backend not in sections:
            return
        key, section = sections[self.backend]
        if section is None:
            raise ConfigError(
                f"{where} has backend {self.backend!r} and no {key}: section; add one with the "
                f"server's url and model, or serve it through routing.deployments whose "
                "replicas give their urls"
            )
        try:
            section.require_endpoint()
        except ValueError as exc:
            raise ConfigError(f"{where}.{key}.{exc}") from None


def _default_models() -> tuple[ModelConfig, ...]:
    return (
        ModelConfig(
            name="smollm2-135m-instruct", kind="generate", artifact="smollm2-135m-instruct"
        ),
        ModelConfig(name="all-minilm-l6-v2", kind="embed", artifact="all-minilm-l6-v2"),
    )


@dataclass(frozen=True)
class RetrievalConfig:
    enabled: bool = True
    """Serve RetrievalService (HNSW collections)."""
    data_dir: Path = field(
        default_factory=lambda: Path(os.path.expanduser("~/.cache/irouter/collections"))
    )
    """One folder per collection, holding its snapshot and write-ahead log."""
    compact_after: int = 10_000
    """Write-ahead-log records that trigger a background snapshot."""
    fsync: bool = True
    """fsync the write-ahead log before acknowledging Upsert/Delete (off only for benchmarks)."""
    max_text_bytes: int = 131_072
    """Longest document text Upsert takes (UTF-8 bytes). A longer text is refused at once
    rather than chunked and embedded past the caller's deadline: MiniLM embeds ~2,400
    tokens/s on 2 AMD EPYC cores, so 128 KiB (~170 chunks of 256 tokens) takes ~20 s there."""
    rag: RagConfig = field(default_factory=RagConfig)
    """How retrieved passages are put into prompts (the retrieval option of Generate)."""

    def validate(self) -> None:
        if self.compact_after < 1:
            raise ValueError(f"retrieval.compact_after={self.compact_after} must be at least 1")
        if self.max_text_bytes < 1:
            raise ValueError(f"retrieval.max_text_bytes={self.max_text_bytes} must be at least 1")
        self.rag.validate()


def _default_cache() -> Path:
    return Path(os.path.expanduser("~/.cache/irouter/models"))


@dataclass(frozen=True)
class RouterConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    """The gRPC server."""
    model_cache: Path = field(default_factory=_default_cache)
    """Where prepared models live (`irouter models prepare` writes there)."""
    models: tuple[ModelConfig, ...] = field(default_factory=_default_models)
    """Served models; the default serves SmolLM2-135M-Instruct and all-MiniLM-L6-v2."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """Vector collections served by RetrievalService."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Authentication, authorization, rate limits, guardrails, audit log (all off by default)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Response cache (exact, L1 + optional Redis L2), semantic cache, embedding cache."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """Deployments of replicas (local devices or remote servers) behind one name, aliases that
    split traffic across them, task routes; a models[] entry a deployment serves is then reached
    through its deployments only."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """The control plane's database: registered model versions and the audit log of changes."""

    def validate(self) -> RouterConfig:
        s = self.server
        for key in ("port", "metrics_port"):
            value = getattr(s, key)
            if not 0 <= value <= 65535:
                raise ConfigError(f"server.{key}={value} is not a port number (0-65535)")
        if s.workers < 1:
            raise ConfigError(f"server.workers={s.workers} must be at least 1")
        if s.workers > 1 and s.port == 0:
            raise ConfigError("server.workers > 1 needs a fixed server.port to share, not 0")
        if s.grace_seconds < 0:
            raise ConfigError(f"server.grace_seconds={s.grace_seconds} must not be negative")
        if s.max_message_bytes < 1024:
            raise ConfigError(f"server.max_message_bytes={s.max_message_bytes} is below 1024")
        try:
            logs.check_level("server.log_level", s.log_level)
            logs.check_level("server.library_log_level", s.library_log_level)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.models:
            raise ConfigError("models is empty: serve at least one model")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"models has duplicate names {duplicates}")
        behind = {d.model_name for d in self.routing.deployments}
        for model in self.models:
            model.validate()
            if model.name not in behind:
                model.check_endpoint()
        try:
            self.guard.validate()
            self.cache.validate()
            self.retrieval.validate()
            self.routing.validate()
            self.registry.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._check_routing()
        semantic = self.cache.semantic
        encoders = sorted(m.name for m in self.models if m.kind == "embed")
        if semantic.enabled and semantic.embedding_model not in encoders:
            raise ConfigError(
                f"cache.semantic.embedding_model={semantic.embedding_model!r} is not a served "
                f"embedding model; served: {encoders}"
            )
        return self

    def _check_routing(self) -> None:
        """What RoutingConfig cannot check alone: the models deployments serve, replica backends,
        names clients use."""
        routing = self.routing
        models = {m.name: m for m in self.models}
        served = {m.model_name for m in routing.deployments}
        for dep in routing.deployments:
            where = f"routing.deployments[{dep.name!r}]"
            model = models.get(dep.model_name)
            if model is None:
                raise ConfigError(
                    f"{where}.model={dep.model_name!r} is not in models[]; models: {sorted(models)}"
                )
            if dep.name in models and dep.name != dep.model_name:
                raise ConfigError(
                    f"{where} has the name of models[{dep.name!r}]; rename one of them"
                )
            for replica in dep.replicas:
                label = f"{where}.replicas[{replica.name!r}]"
                if replica.backend not in BACKEND_KINDS:
                    raise ConfigError(
                        f"{label}.backend={replica.backend!r} is unknown; use one of "
                        f"{BACKEND_KINDS}"
                    )
                remote = replica.backend in REMOTE_BACKENDS
                if remote != replica.remote:
                    raise ConfigError(
                        f"{label}: backend {replica.backend!r} "
                        + ("needs a url" if remote else "runs locally and takes no url")
                    )
                try:
                    as_run = replica_model(model, dep.name, replica)
                    as_run.validate()
                    as_run.check_endpoint()
                except ConfigError as exc:
                    raise ConfigError(f"{label}: {exc}") from None
            for target in dep.fallbacks:
                other = models[routing.deployment(target).model_name]
                if other.artifact != model.artifact:
                    raise ConfigError(
                        f"{where}.fallbacks names {target!r}, which serves artifact "
                        f"{other.artifact!r}, not {model.artifact!r}: a call is tokenized once, "
                        "so a fallback must serve the same model (use an alias to split "
                        "traffic across different models)"
                    )
        for alias in routing.aliases:
            if alias in models and alias not in served:
                raise ConfigError(
                    f"routing.aliases[{alias!r}] has the name of models[{alias!r}]; rename one"
                )
        # Aliases and tasks pick a deployment per Generate call; an embedding deployment is
        # called by its name (vectors of two models must not be mixed by a traffic split).
        kinds = {d.name: models[d.model_name].kind for d in routing.deployments}
        routed = [
            (f"routing.aliases[{alias!r}]", target)
            for alias, targets in routing.aliases.items()
            for target in targets
        ] + [(f"routing.tasks[{task!r}]", target) for task, target in routing.tasks.items()]
        for label, target in routed:
            if kinds.get(target, "generate") != "generate":
                raise ConfigError(
                    f"{label} names {target!r}, an embedding deployment; aliases and tasks "
                    "route generation calls (call an embedding deployment by its name)"
                )


def replica_secret(variable: str) -> str:
    """The value of environment variable `variable` (a replica's API key); ConfigError naming it
    when this router's environment does not set it."""
    value = os.environ.get(variable, "")
    if not value:
        raise ConfigError(
            f"api_key_env={variable!r}: the environment variable is not set on this router; "
            "set it to the server's API key on every router that serves the replica"
        )
    return value


def replica_model(model: ModelConfig, deployment: str, replica: Any) -> ModelConfig:
    """The models[] entry as one replica of a deployment runs it: its backend, device or URL."""
    changes: dict[str, Any] = {"name": f"{deployment}/{replica.name}", "backend": replica.backend}
    # Each remote backend's section: the model's own when it has one, at the replica's URL.
    remotes: dict[str, tuple[str, type[OpenAIHttpConfig] | type[KServeConfig]]] = {
        "openai_http": ("remote", OpenAIHttpConfig),
        "kserve_grpc": ("kserve", KServeConfig),
    }
    for backend, (key, cls) in remotes.items():
        if replica.backend != backend:
            changes[key] = None
            continue
        base = getattr(model, key) or cls()
        changes[key] = dataclasses.replace(
            base, url=replica.url, model=replica.remote_model or base.model or model.name
        )
        if backend == "openai_http":
            remote = changes[key]
            if replica.dialect:  # another kind of server: the model's api_version is not its
                remote = dataclasses.replace(
                    remote, dialect=replica.dialect, api_version=replica.api_version
                )
            if replica.api_key_env:
                remote = dataclasses.replace(remote, api_key=replica_secret(replica.api_key_env))
            changes[key] = remote
    if replica.device:
        changes["device"] = replica.device
    elif model.backend != replica.backend:
        changes["device"] = "CPU"
    if model.backend != replica.backend:
        changes["precision"] = ""
        changes["engine_path"] = ""
    return dataclasses.replace(model, **changes)

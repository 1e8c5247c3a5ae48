"""The models this router serves, by name: load, warm up, look up, and describe them.

A model is registered before it is loaded, so ListModels and health answer at once (not ready,
NOT_SERVING); calls to a model that is still loading get UNAVAILABLE rather than waiting.

With a `routing:` config, a deployment is served like a model (its name, the tokenizer and chat
template of the model it serves) whose engine is a `RoutedEngine` over its replicas; each replica
is a ServedModel of its own (one engine each: a local backend on a device, or a remote server),
not visible to clients. Aliases and tasks resolve to a deployment per call.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from backends.artifact import read_manifest
from backends.base import DecoderStepEngine, EncoderEngine, RemoteEmbedder, RequestEngine
from backends.factory import create_backend, create_remote_embedder
from backends.remote import RemoteError
from router.config import ConfigError, ModelConfig, replica_model
from router.errors import InvalidArgument, NotFound, Unavailable
from router.models.chat_template import render_chat
from router.models.prepare import smollm2_gguf_path
from router.retrieval import chunking
from router.routing.attempt import AttemptInfo
from router.routing.breaker import BreakerState
from router.routing.config import DeploymentConfig, ReplicaConfig, RoutingConfig
from router.routing.dispatch import Dispatcher
from router.routing.engine import RoutedEngine
from router.scheduler.batcher import EncoderBatcher
from router.scheduler.engine import DecoderEngine, EngineLimits, GenerationEngine
from router.scheduler.remote_errors import remote_error
from router.scheduler.request import Priority, Request, SamplingParams
from router.scheduler.request_engine import RequestEngineAdapter
from router.telemetry import Metrics, ReplicaSample

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class ServedModel:
    config: ModelConfig
    model_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    tokenizer: Tokenizer | None = None
    engine: GenerationEngine | None = None
    batcher: EncoderBatcher | None = None
    remote_embedder: RemoteEmbedder | None = None
    """An embedding model served by a remote server (instead of `batcher`)."""
    context_length: int = 0
    dimension: int = 0
    ready: bool = False
    error: str = ""
    deployment: DeploymentConfig | None = None
    """Set on a deployment (engine: RoutedEngine over `replicas`)."""
    replicas: tuple[ServedModel, ...] = ()
    """A deployment's replicas, in config order."""
    replica: ReplicaConfig | None = None
    """Set on a replica of a deployment."""

    @property
    def name(self) -> str:
        return self.config.name


def _gguf_source(manifest: dict[str, Any]) -> Path | None:
    """The GGUF a prepared decoder was built from, when it is installed (engines that convert
    the GGUF themselves, e.g. OpenVINO GenAI, read it on their first load)."""
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        return None
    return path if path.name == manifest.get("source") else None


class ServedModels:
    def __init__(
        self,
        configs: tuple[ModelConfig, ...],
        model_cache: Path,
        metrics: Metrics,
        routing: RoutingConfig | None = None,
    ):
        self._metrics = metrics
        self._engine_ids = 0
        self._attempt_counters: dict[tuple[str, str], Any] = {}
        self._replica_models: dict[tuple[str, str], ServedModel] = {}
        """(deployment, replica) → the replica, looked up on every routed attempt."""
        routing = routing or RoutingConfig()
        self.routing = routing
        self.aliases = dict(routing.aliases)
        self.tasks = dict(routing.tasks)
        by_name = {c.name: c for c in configs}
        behind = {d.model_name for d in routing.deployments}
        # A model a deployment serves is reached through its deployments only.
        self._models = {
            c.name: ServedModel(c, model_cache / c.artifact)
            for c in configs
            if c.name not in behind
        }
        self.dispatcher: Dispatcher | None = None
        if routing.deployments:
            self.dispatcher = Dispatcher(
                routing,
                on_breaker_change=self._breaker_changed,
                on_attempt_failed=self._attempt_failed,
            )
        for dep in routing.deployments:
            model = by_name[dep.model_name]
            replicas = tuple(
                ServedModel(
                    replica_model(model, dep.name, r), model_cache / model.artifact, replica=r
                )
                for r in dep.replicas
            )
            shell = ServedModel(
                dataclasses.replace(model, name=dep.name),
                model_cache / model.artifact,
                deployment=dep,
                replicas=replicas,
            )
            self._models[dep.name] = shell
            for rc, served in zip(dep.replicas, replicas, strict=True):
                self._replica_models[dep.name, rc.name] = served
            assert self.dispatcher is not None
            for r in dep.replicas:
                self.dispatcher.set_healthy(dep.name, r.name, False)  # until it has loaded
        self.on_routing_change: Callable[[], None] | None = None
        """Called (no arguments) when a breaker changes state; the server republishes health."""

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def replicas(self) -> list[ServedModel]:
        """Every replica of every deployment."""
        return [r for m in self._models.values() for r in m.replicas]

    # ---- routing -----------------------------------------------------------------------------

    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        deployment, _, replica = name.partition("/")
        self._metrics.breaker_transitions.labels(deployment, replica, new.name.lower()).inc()
        log = logger.warning if new is BreakerState.OPEN else logger.info
        log("replica %s: circuit %s -> %s", name, old.name.lower(), new.name.lower())
        if self.on_routing_change is not None:
            self.on_routing_change()

    def reload_routing(self, routing: RoutingConfig) -> list[str]:
        """Take a new, validated routing config that keeps every deployment's model and
        replicas (names, backends, devices, URLs): weights, aliases, tasks, balancers,
        breakers, retries, hedging, fallbacks and health checks change at once, for the calls
        that start from now on. Returns what changed, in words; raises ConfigError naming what
        would need a restart (a replica's engine is built once, at start)."""
        old = self.routing
        if self.dispatcher is None or not routing.deployments:
            raise ConfigError(
                "routing reload needs deployments both before and after; adding or removing "
                "routing altogether needs a restart"
            )
        problems = _structural_changes(old, routing)
        if problems:
            raise ConfigError(
                "routing reload can change weights, aliases, tasks and policies only; these "
                f"need a restart: {'; '.join(problems)}"
            )
        self.dispatcher.reconfigure(routing)
        for dc in routing.deployments:
            shell = self._models[dc.name]
            shell.deployment = dc
            if isinstance(shell.engine, RoutedEngine):
                shell.engine.hedged = dc.hedging.enabled
        self.routing = routing
        self.aliases = dict(routing.aliases)
        self.tasks = dict(routing.tasks)
        return _routing_diff(old, routing)

    def _attempt_started(self, info: AttemptInfo) -> None:
        key = (info.deployment, info.replica.name)
        child = self._attempt_counters.get(key)
        if child is None:
            child = self._attempt_counters[key] = self._metrics.routing_attempts.labels(*key)
        child.inc()

    def _attempt_failed(self, info: AttemptInfo, reason: str) -> None:
        self._metrics.failed_attempts.labels(info.deployment, info.replica.name).inc()

    def replica_samples(self) -> list[ReplicaSample]:
        """Replica state for the metrics collector."""
        if self.dispatcher is None:
            return []
        return [
            ReplicaSample(name, r.name, int(r.breaker.state), r.healthy, r.outstanding)
            for name, health in self.dispatcher.health().items()
            for r in health.replicas
        ]

    def _replica_engine(self, deployment: str, replica: str) -> GenerationEngine:
        served = self._replica_models[deployment, replica]
        if served.engine is None:
            why = f": {served.error}" if served.error else " (still loading)"
            raise Unavailable(f"replica {deployment}/{replica} is not loaded{why}")
        return served.engine

    # ---- life cycle --------------------------------------------------------------------------

    def load(self, model: ServedModel) -> None:
        """Blocking: build the backend and tokenizer (a deployment: its tokenizer and routed
        engine; its replicas load one by one with `load` too). Runs in a worker thread."""
        cfg = model.config
        model.manifest = read_manifest(model.model_dir)
        model.tokenizer = Tokenizer.from_file(str(model.model_dir / "tokenizer.json"))
        if model.deployment is not None:
            assert self.dispatcher is not None
            replicas = model.replicas
            model.context_length = min(cfg.max_context, int(model.manifest["context_length"]))
            model.engine = RoutedEngine(
                cfg.name,
                self.dispatcher,
                self._replica_engine,
                lambda: [r.engine for r in replicas if r.engine is not None],
                self.next_engine_id,
                hedged=model.deployment.hedging.enabled,
                on_attempt=self._attempt_started,
            )
            return
        observer = self._metrics.model_observer(cfg.name)
        if cfg.kind == "generate":
            context = min(cfg.max_context, int(model.manifest["context_length"]))
            options: dict[str, Any] = {
                "max_slots": cfg.max_slots,
                "max_context": context,
                "threads": cfg.threads,
            }
            if cfg.backend == "tensorrt_llm":
                options |= {"device": cfg.device, "engine_path": cfg.engine_path}
            if cfg.backend == "openai_http":
                options |= {"remote": cfg.remote}
            if cfg.backend == "kserve_grpc":
                options |= {"kserve": cfg.kserve}
            if cfg.backend == "openvino":
                options |= {
                    "device": cfg.device,
                    "precision": cfg.precision,
                    "token_budget": cfg.token_budget,
                    "gguf_path": _gguf_source(model.manifest),
                    "observer": observer,
                }
            backend = create_backend(cfg.backend, model.model_dir, **options)
            model.context_length = context
            limits = EngineLimits(cfg.max_slots, cfg.token_budget, cfg.max_waiting, context)
            stop_ids = [int(i) for i in model.manifest["stop_token_ids"]]
            if isinstance(backend, RequestEngine):
                # The backend batches whole requests itself; the router streams its tokens.
                model.engine = RequestEngineAdapter(
                    cfg.name, backend, model.tokenizer, limits, stop_ids
                )
            else:
                model.engine = DecoderEngine(
                    cfg.name,
                    cast(DecoderStepEngine, backend),
                    model.tokenizer,
                    limits,
                    stop_ids,
                    observer,
                )
        elif cfg.remote is not None:
            # A remote embedding server: the router's tokenizer still validates and counts.
            model.tokenizer.no_padding()
            model.tokenizer.no_truncation()
            model.context_length = int(model.manifest["max_length"])
            model.remote_embedder = create_remote_embedder(cfg.remote)
        else:
            model.tokenizer.no_padding()
            encoder_options: dict[str, Any] = {"threads": cfg.threads}
            if cfg.backend == "openvino":
                encoder_options |= {"device": cfg.device, "precision": cfg.precision}
            backend = create_backend(cfg.backend, model.model_dir, **encoder_options)
            model.context_length = int(model.manifest["max_length"])
            model.dimension = int(model.manifest["embedding_dim"])
            model.tokenizer.no_truncation()
            model.batcher = EncoderBatcher(
                cfg.name,
                cast(EncoderEngine, backend),
                max_batch=cfg.max_batch,
                max_delay_s=cfg.max_delay_ms / 1000.0,
                pad_id=int(model.manifest.get("pad_token_id", 0)),
                observer=observer,
            )

    def start(self, model: ServedModel) -> None:
        """On the event loop, after load(): start the engine thread or batcher task."""
        if model.engine is not None:
            model.engine.start()
        if model.batcher is not None:
            model.batcher.start()
        if model.remote_embedder is not None:
            model.remote_embedder.start()
        model.ready = True

    async def stop(self) -> None:
        for model in [*self._models.values(), *self.replicas()]:
            model.ready = False
            if model.engine is not None:
                model.engine.stop()
            if model.batcher is not None:
                await model.batcher.stop()
            if model.remote_embedder is not None:
                await model.remote_embedder.aclose()

    # ---- lookup ------------------------------------------------------------------------------

    def get(self, name: str, kind: str, *, task: str = "", key: str | None = None) -> ServedModel:
        """The model (or deployment) a call names; an alias or a `task` picks a deployment (by
        `key` when given, so a caller stays on one side of a split)."""
        if task or name in self.aliases:
            if task and name:
                raise InvalidArgument(
                    f"set model or task, not both (model={name!r}, task={task!r})", field="task"
                )
            if self.dispatcher is None or kind != "generate":
                raise NotFound(f"task {task!r} has no route: this router routes no tasks")
            name = self.dispatcher.resolve(name, task=task, key=key)
        model = self._models.get(name)
        if model is None or model.config.kind != kind:
            names = sorted(m.name for m in self._models.values() if m.config.kind == kind)
            if kind == "generate":
                names = sorted([*names, *self.aliases])
            verb = "generation" if kind == "generate" else "embedding"
            if not name:
                raise InvalidArgument(
                    f"model is empty; {verb} models served: {names}", field="model"
                )
            raise NotFound(f"model {name!r} is not served; {verb} models served: {names}")
        if not model.ready:
            why = f": {model.error}" if model.error else " (still loading)"
            raise Unavailable(f"model {name!r} is not ready{why}")
        return model

    def next_engine_id(self) -> int:
        self._engine_ids += 1
        return self._engine_ids

    # ---- request building --------------------------------------------------------------------

    def render(
        self,
        model: ServedModel,
        *,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
    ) -> str:
        """The prompt text the model sees: chat messages through its template, or the prompt."""
        if messages is not None:
            if not messages:
                raise InvalidArgument("chat.messages is empty", field="chat.messages")
            for i, m in enumerate(messages):
                if m["role"] not in CHAT_ROLES:
                    raise InvalidArgument(
                        f"chat.messages[{i}].role={m['role']!r} is not one of {CHAT_ROLES}",
                        field=f"chat.messages[{i}].role",
                    )
            try:
                return render_chat(model.manifest["chat_template"], messages)
            except ValueError as exc:
                raise InvalidArgument(str(exc), field="chat.messages") from None
        if prompt:
            return prompt
        if prompt is not None:
            raise InvalidArgument("prompt is empty", field="prompt")
        raise InvalidArgument("set one of prompt or chat", field="input")

    def encode(self, model: ServedModel, text: str) -> list[int]:
        """A rendered prompt's token ids (BOS added when the model wants one)."""
        assert model.tokenizer is not None
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids
        bos = model.manifest.get("bos_token_id")
        if model.manifest.get("add_bos_token") and bos is not None and ids[:1] != [bos]:
            ids.insert(0, int(bos))
        if not ids:
            raise InvalidArgument("the input tokenizes to no tokens", field="prompt")
        return ids

    def prompt_ids(
        self,
        model: ServedModel,
        *,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
    ) -> list[int]:
        return self.encode(model, self.render(model, prompt=prompt, messages=messages))

    def build_request(
        self,
        model: ServedModel,
        request_id: str,
        *,
        text: str,
        params: SamplingParams,
        max_tokens_set: bool,
        priority: Priority,
    ) -> Request:
        """Tokenize a rendered prompt (see `render`) and validate; raise InvalidArgument naming
        what is wrong."""
        ids = self.encode(model, text)
        context = model.context_length
        room = context - len(ids)
        if room < 1:
            raise InvalidArgument(
                f"the prompt has {len(ids)} tokens; model {model.name!r} allows at most "
                f"{context - 1} so that at least one token can be generated",
                field="prompt",
            )
        vocab = int(model.manifest["vocab_size"])
        if max_tokens_set:
            if params.max_tokens > room:
                raise InvalidArgument(
                    f"max_tokens={params.max_tokens} exceeds the context limit of model "
                    f"{model.name!r} ({context} tokens including the {len(ids)}-token prompt)",
                    field="sampling.max_tokens",
                )
        else:
            params = dataclasses.replace(
                params, max_tokens=min(model.config.default_max_tokens, room)
            )
        params.validate(vocab)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Request(
            request_id=request_id,
            engine_id=self.next_engine_id(),
            prompt_ids=ids,
            params=params,
            priority=priority,
            seed=seed,
            prompt_text=text,
        )

    def check_batch(self, model: ServedModel, texts: Sequence[str]) -> None:
        """An Embed call's texts: at least one, at most the model's batch."""
        if not texts:
            raise InvalidArgument("texts is empty: give at least one text", field="texts")
        if len(texts) > model.config.max_batch:
            raise InvalidArgument(
                f"texts has {len(texts)} entries; model {model.name!r} takes at most "
                f"{model.config.max_batch} per call",
                field="texts",
            )

    def encode_texts(
        self,
        model: ServedModel,
        texts: Sequence[str],
        *,
        positions: Sequence[int] | None = None,
        field: str = "texts",
        truncate: bool = False,
    ) -> list[chunking.Piece]:
        """Each text with its encoder token ids, checked to be non-empty and to fit the window.
        `positions` are the texts' indexes in the request (for the error's field name);
        `truncate` keeps the first window of a longer text instead of refusing it (queries)."""
        assert model.tokenizer is not None
        where = positions if positions is not None else range(len(texts))
        for i, text in zip(where, texts, strict=True):
            if not text:
                raise InvalidArgument(f"{field}[{i}] is empty", field=f"{field}[{i}]")
        if truncate:
            pieces = chunking.split(model.tokenizer, list(texts), model.context_length)
            return [chunks[0] for chunks in pieces]
        out: list[chunking.Piece] = []
        for i, text, enc in zip(
            where, texts, model.tokenizer.encode_batch(list(texts)), strict=True
        ):
            if len(enc.ids) > model.context_length:
                raise InvalidArgument(
                    f"{field}[{i}] has {len(enc.ids)} tokens; model {model.name!r} embeds at most "
                    f"{model.context_length}",
                    field=f"{field}[{i}]",
                )
            out.append(chunking.Piece(text, enc.ids))
        return out

    async def embed_pieces(
        self, model: ServedModel, pieces: Sequence[chunking.Piece]
    ) -> npt.NDArray[np.float32]:
        """One batch (at most the model's max_batch) through its encoder: the local batcher
        takes the token ids, a remote server the texts."""
        if model.remote_embedder is not None:
            try:
                vectors = await model.remote_embedder.embed([p.text for p in pieces])
            except RemoteError as exc:
                raise remote_error(model.name, exc) from None
            model.dimension = model.dimension or int(vectors.shape[1])
            return vectors
        assert model.batcher is not None
        return await model.batcher.embed([p.ids for p in pieces])


def _structural_changes(old: RoutingConfig, new: RoutingConfig) -> list[str]:
    """What differs between two routing configs beyond what a reload may change."""
    problems = []
    before = {d.name: d for d in old.deployments}
    after = {d.name: d for d in new.deployments}
    if set(before) != set(after):
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        problems.append(f"deployments added {added} / removed {removed}")
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        if a.model_name != b.model_name:
            problems.append(f"deployment {name!r} model {a.model_name!r} -> {b.model_name!r}")
        engines_a = {r.name: dataclasses.replace(r, weight=1.0) for r in a.replicas}
        engines_b = {r.name: dataclasses.replace(r, weight=1.0) for r in b.replicas}
        if engines_a != engines_b:
            problems.append(f"deployment {name!r} replicas (other than their weights)")
    return problems


def _routing_diff(old: RoutingConfig, new: RoutingConfig) -> list[str]:
    """What a reload changed, for the log."""
    changes = []
    before = {d.name: d for d in old.deployments}
    for dc in new.deployments:
        if before[dc.name] != dc:
            changes.append(f"deployment {dc.name!r}")
    aliases = {name: dict(split) for name, split in new.aliases.items()}
    if {name: dict(split) for name, split in old.aliases.items()} != aliases:
        changes.append(f"aliases {aliases}")
    if dict(old.tasks) != dict(new.tasks):
        changes.append(f"tasks {dict(new.tasks)}")
    return changes

"""The catalog of served models, by name: created from the config, loaded, looked up per call,
stopped. (Loading itself is loader.py; what a call's input becomes is prompt.py and
embedding.py.)

A model is registered before it is loaded, so ListModels and health answer at once (not ready,
NOT_SERVING); calls to a model that is still loading get UNAVAILABLE rather than waiting.

With a `routing:` config, a deployment is served like a model (its name, the tokenizer and chat
template of the model it serves) whose engine is a `RoutedEngine` over its replicas; each replica
is a ServedModel of its own (one engine each: a local backend on a device, or a remote server),
not visible to clients. Aliases and tasks resolve to a deployment per call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.config import ConfigError, ModelConfig, replica_model
from router.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable, quote
from router.retrieval import chunking
from router.routing import reload
from router.routing.attempt import AttemptInfo
from router.routing.breaker import BreakerState
from router.routing.config import DeploymentConfig, ReplicaConfig, RoutingConfig
from router.routing.dispatch import Dispatcher
from router.routing.embedder import RoutedEmbedder, Vectors
from router.routing.engine import RoutedEngine
from router.routing.replica_stats import ReplicaStatsBook
from router.scheduler.generation import GenerationEngine
from router.serving import embedding, loader
from router.serving.model import ServedModel
from router.telemetry import Metrics, ReplicaSample

if TYPE_CHECKING:
    from router.control.access import DeploymentAccess

logger = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.05
"""How often a draining model is looked at for calls still in flight."""


def _in_flight(model: ServedModel) -> int:
    """Calls a model is still answering (generation: streams; embedding: texts batched)."""
    if model.engine is not None:
        return model.engine.num_unfinished
    if model.batcher is not None:
        return model.batcher.num_pending
    if model.routed_embedder is not None:
        return sum(_in_flight(r) for r in model.replicas)
    return 0


async def _drain(models: list[ServedModel], grace_s: float) -> None:
    """Wait until none of `models` has a call in flight, at most `grace_s`."""
    try:
        async with asyncio.timeout(grace_s):
            while any(_in_flight(m) for m in models):
                await asyncio.sleep(_DRAIN_POLL_S)
    except TimeoutError:
        logger.warning(
            "%s: %d call(s) still in flight after %.3gs; cancelling them",
            ", ".join(m.name for m in models),
            sum(_in_flight(m) for m in models),
            grace_s,
        )


class Catalog:
    """The served models by name: created from the config, loaded, looked up per call, stopped.
    Deployments, their replicas, aliases and tasks resolve here too."""

    def __init__(
        self,
        configs: tuple[ModelConfig, ...],
        model_cache: Path,
        metrics: Metrics,
        routing: RoutingConfig | None = None,
    ):
        self._metrics = metrics
        self._model_cache = model_cache
        self.access: dict[str, DeploymentAccess] = {}
        """Deployments' own authentication and limits, by name (the control plane sets them)."""
        self.stats = ReplicaStatsBook(metrics)
        """Per-replica attempts, failures and first-token times (rollouts judge by them)."""
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
            self.dispatcher = self._new_dispatcher(routing)
        for dep in routing.deployments:
            self._register_deployment(by_name[dep.model_name], dep)
        self.on_routing_change: Callable[[], None] | None = None
        """Called (no arguments) when a breaker changes state; the server republishes health."""

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def _new_dispatcher(self, routing: RoutingConfig) -> Dispatcher:
        return Dispatcher(
            routing,
            on_breaker_change=self._breaker_changed,
            on_attempt_failed=self._attempt_failed,
            on_first_item=self.stats.first_item,
        )

    def _replica(self, model: ModelConfig, deployment: str, rc: ReplicaConfig) -> ServedModel:
        served = ServedModel(
            replica_model(model, deployment, rc), self._model_cache / model.artifact, replica=rc
        )
        self._replica_models[deployment, rc.name] = served
        assert self.dispatcher is not None
        self.dispatcher.set_healthy(deployment, rc.name, False)  # until it has loaded
        return served

    def _register_deployment(self, model: ModelConfig, dep: DeploymentConfig) -> ServedModel:
        """The deployment's shell (its name, the model's tokenizer) and its replicas, listed;
        the dispatcher must know the deployment already."""
        replicas = tuple(self._replica(model, dep.name, rc) for rc in dep.replicas)
        shell = ServedModel(
            dataclasses.replace(model, name=dep.name),
            self._model_cache / model.artifact,
            deployment=dep,
            replicas=replicas,
        )
        self._models[dep.name] = shell
        return shell

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
        problems = reload.structural_changes(old, routing)
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
        return reload.routing_diff(old, routing)

    def _attempt_started(self, info: AttemptInfo) -> None:
        self.stats.started(info)
        key = (info.deployment, info.replica.name)
        child = self._attempt_counters.get(key)
        if child is None:
            child = self._attempt_counters[key] = self._metrics.routing_attempts.labels(*key)
        child.inc()

    def _attempt_failed(self, info: AttemptInfo, reason: str) -> None:
        self.stats.failed(info)
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

    async def _replica_embed(
        self,
        deployment: str,
        replica: str,
        pieces: Sequence[chunking.Piece],
        counted: list[int] | None,
    ) -> Vectors:
        served = self._replica_models[deployment, replica]
        if not served.loaded:
            why = f": {served.error}" if served.error else " (still loading)"
            raise Unavailable(f"replica {deployment}/{replica} is not loaded{why}")
        return await embedding.embed_pieces(served, pieces, counted)

    # ---- life cycle --------------------------------------------------------------------------

    def load(self, model: ServedModel) -> None:
        """Blocking: build the backend and tokenizer (a deployment: its tokenizer and routed
        engine; its replicas load one by one with `load` too). Runs in a worker thread."""
        loader.load_artifact(model)
        if model.deployment is None:
            loader.load_engine(model, self._metrics)
            return
        assert self.dispatcher is not None
        if model.config.kind == "embed":
            model.routed_embedder = RoutedEmbedder(
                model.name, self.dispatcher, self._replica_embed, on_attempt=self._attempt_started
            )
            return
        replicas = model.replicas
        model.engine = RoutedEngine(
            model.name,
            self.dispatcher,
            self._replica_engine,
            lambda: [r.engine for r in replicas if r.engine is not None],
            self.next_engine_id,
            hedged=model.deployment.hedging.enabled,
            on_attempt=self._attempt_started,
        )

    def start(self, model: ServedModel) -> None:
        """On the event loop, after load(): start the engine thread or batcher task."""
        loader.start(model)

    async def stop(self) -> None:
        for model in [*self._models.values(), *self.replicas()]:
            await loader.stop(model)

    # ---- lookup ------------------------------------------------------------------------------

    def get(self, name: str, kind: str, *, task: str = "", key: str | None = None) -> ServedModel:
        """The model (or deployment) a call names; an alias or a `task` picks a deployment (by
        `key` when given, so a caller stays on one side of a split)."""
        if task or name in self.aliases:
            if task and name:
                raise InvalidArgument(
                    f"set model or task, not both (model={quote(name)}, task={quote(task)})",
                    field="task",
                )
            if self.dispatcher is None or kind != "generate":
                raise NotFound(f"task {quote(task)} has no route: this router routes no tasks")
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
            raise NotFound(f"model {quote(name)} is not served; {verb} models served: {names}")
        if model.draining:
            raise Unavailable(f"model {name!r} is being removed; it takes no new calls")
        if not model.ready:
            why = f": {model.error}" if model.error else " (still loading)"
            raise Unavailable(f"model {name!r} is not ready{why}")
        return model

    # ---- run-time changes --------------------------------------------------------------------
    # A model added here goes through the same life cycle as one from the config file: load
    # (worker thread) → start → warm up → serve; removal is drain → unload. Deployments are
    # added and removed by the control plane's work, on top of these.

    def add(self, config: ModelConfig) -> ServedModel:
        """Register a model while serving; it is listed at once, not ready until loaded (the
        caller runs load, start and warm-up as at start). Raises ConfigError naming what is
        wrong (bad config, a name already in use), with nothing registered."""
        config.validate()
        config.check_endpoint()
        taken = set(self._models) | set(self.aliases)
        if config.name in taken:
            raise ConfigError(f"models[{config.name!r}]: the name is already served")
        model = ServedModel(config, self._model_cache / config.artifact)
        self._models[config.name] = model
        return model

    async def remove(self, name: str, *, grace_s: float) -> ServedModel:
        """Drain then unload a model (not a deployment): new calls are refused at once, calls
        in flight get up to `grace_s` to finish (then they are cancelled), the engine stops and
        the name is free. Raises NotFound for a name not served."""
        model = self._models.get(name)
        if model is None or model.deployment is not None:
            raise NotFound(f"model {quote(name)} is not a model this router serves")
        model.draining = True
        await _drain([model], grace_s)
        await loader.stop(model)
        del self._models[name]
        return model

    # A deployment added here (the control plane's DeploymentService) is served like one from
    # the config file; the caller loads its shell and replicas as at start.

    def add_deployment(self, model: ModelConfig, dep: DeploymentConfig) -> ServedModel:
        """Register a deployment of `model` while serving: listed at once, not ready, its
        replicas out of rotation until loaded. AlreadyExists for a name in use."""
        model.validate()
        if dep.name in self._models or dep.name in self.aliases:
            raise AlreadyExists(f"the name {quote(dep.name)} is already served; choose another")
        routing = dataclasses.replace(self.routing, deployments=(*self.routing.deployments, dep))
        routing.validate()
        if self.dispatcher is None:
            self.dispatcher = self._new_dispatcher(routing)
        else:
            self.dispatcher.reconfigure(routing)
        self.routing = routing
        return self._register_deployment(model, dep)

    def add_replicas(
        self, name: str, added: tuple[ReplicaConfig, ...], model: ModelConfig | None = None
    ) -> list[ServedModel]:
        """More replicas for a deployment (out of rotation until the caller has loaded them),
        of `model` when given (a rollout's new version: same tokenizer, other artifact or
        engine settings), else of the deployment's own model."""
        shell = self._deployment(name)
        assert shell.deployment is not None and self.dispatcher is not None
        dep = dataclasses.replace(shell.deployment, replicas=(*shell.deployment.replicas, *added))
        self._set_deployment(shell, dep)
        if model is None:
            model = dataclasses.replace(shell.config, name=shell.deployment.model_name)
        new = [self._replica(model, name, rc) for rc in added]
        shell.replicas = (*shell.replicas, *new)
        return new

    async def remove_replicas(self, name: str, names: set[str], *, grace_s: float) -> None:
        """Take replicas out of rotation, let their calls in flight finish (up to `grace_s`),
        then stop them; the deployment keeps at least one."""
        shell = self._deployment(name)
        assert shell.deployment is not None and self.dispatcher is not None
        leaving = [r for r in shell.replicas if r.replica is not None and r.replica.name in names]
        for replica in leaving:
            assert replica.replica is not None
            self.dispatcher.set_healthy(name, replica.replica.name, False)
        await _drain(leaving, grace_s)
        kept = tuple(rc for rc in shell.deployment.replicas if rc.name not in names)
        self._set_deployment(shell, dataclasses.replace(shell.deployment, replicas=kept))
        shell.replicas = tuple(r for r in shell.replicas if r not in leaving)
        for replica in leaving:
            await loader.stop(replica)
            assert replica.replica is not None
            del self._replica_models[name, replica.replica.name]
            self.stats.forget(name, replica.replica.name)

    def set_weights(self, name: str, weights: dict[str, float]) -> None:
        """Give the named replicas of a deployment these shares of its traffic (> 0)."""
        shell = self._deployment(name)
        assert shell.deployment is not None
        replicas = tuple(
            dataclasses.replace(rc, weight=weights.get(rc.name, rc.weight))
            for rc in shell.deployment.replicas
        )
        self._set_deployment(shell, dataclasses.replace(shell.deployment, replicas=replicas))
        for served in shell.replicas:
            if served.replica is not None and served.replica.name in weights:
                served.replica = dataclasses.replace(
                    served.replica, weight=weights[served.replica.name]
                )

    def set_model(self, name: str, model: ModelConfig) -> None:
        """The model a deployment's later replicas are made of (after a rollout)."""
        shell = self._deployment(name)
        shell.config = dataclasses.replace(model, name=name)

    async def remove_deployment(self, name: str, *, grace_s: float) -> None:
        """Drain then unload a deployment: new calls are refused at once, calls in flight get
        up to `grace_s`, then its replicas stop and its name is free."""
        shell = self._deployment(name)
        shell.draining = True
        await _drain([shell], grace_s)
        for replica in (*shell.replicas, shell):
            await loader.stop(replica)
            if replica.replica is not None:
                del self._replica_models[name, replica.replica.name]
        del self._models[name]
        self.access.pop(name, None)
        routing = dataclasses.replace(
            self.routing, deployments=tuple(d for d in self.routing.deployments if d.name != name)
        )
        assert self.dispatcher is not None
        self.dispatcher.reconfigure(routing)
        self.routing = routing

    def _deployment(self, name: str) -> ServedModel:
        shell = self._models.get(name)
        if shell is None or shell.deployment is None:
            raise NotFound(f"deployment {quote(name)} is not served here")
        return shell

    def _set_deployment(self, shell: ServedModel, dep: DeploymentConfig) -> None:
        routing = dataclasses.replace(
            self.routing,
            deployments=tuple(dep if d.name == dep.name else d for d in self.routing.deployments),
        )
        assert self.dispatcher is not None
        self.dispatcher.reconfigure(routing)
        self.routing = routing
        shell.deployment = dep

    def next_engine_id(self) -> int:
        self._engine_ids += 1
        return self._engine_ids

"""The life cycle of what the router serves, while it serves: load → warm up → serve, and
drain → stop, for models and deployments alike, with health published as each changes (a
model: SERVING once warm; a deployment: SERVING while a replica of it, or of a fallback, would
take a call). Run-time changes (the control plane, SIGHUP's routing reload) come through here,
as does loading at start."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from router.config import ModelConfig
from router.errors import FailedPrecondition
from router.routing.config import DeploymentConfig, ReplicaConfig, RoutingConfig
from router.routing.health import HealthChecker
from router.serving import loader
from router.serving.catalog import Catalog
from router.serving.model import ServedModel
from router.telemetry import Metrics

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Lifecycle:
    """Brings the catalog's models and deployments up and down, publishing their health."""

    def __init__(
        self, models: Catalog, health_servicer: health.aio.HealthServicer, metrics: Metrics
    ) -> None:
        self.models = models
        self.health = health_servicer
        self.metrics = metrics
        self._checks: asyncio.Task[None] | None = None
        self._publishing: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Cancel the health checks and any health publishing under way."""
        for task in (self._checks, self._publishing):
            if task is not None:
                task.cancel()

    async def load_all(self) -> None:
        """Load every model and deployment of the catalog, one after the other (at start)."""
        for model in list(self.models):  # models may be added while these load
            if not await self._bring_up(model):
                continue
            if model.deployment is not None:
                for replica in model.replicas:
                    await self._load_replica(model, replica)
                await self._publish(model)
                logger.info(
                    "deployment %s: %d of %d replicas healthy",
                    model.name,
                    sum(r.ready for r in model.replicas),
                    len(model.replicas),
                )
                continue
            await self.health.set(model.name, SERVING)
            logger.info("model %s is serving", model.name)

    async def _bring_up(self, model: ServedModel) -> bool:
        """Load, start and (a model, not a deployment) warm up; False with model.error set when
        that failed."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.models.load, model)
            self.models.start(model)
            if model.deployment is None:
                await loader.warm_up(model, self.models.next_engine_id())
        except Exception as exc:
            model.ready = False
            model.error = f"{type(exc).__name__}: {exc}"
            logger.exception("model %s failed to load", model.name)
            return False
        return True

    async def add_model(self, config: ModelConfig) -> ServedModel:
        """Serve one more model, without a restart: registered (listed, NOT_SERVING), loaded,
        warmed up, then SERVING. A config error or a failed load raises (ConfigError, or
        FailedPrecondition naming what failed) and leaves nothing behind: no entry, no engine."""
        model = self.models.add(config)
        await self.health.set(model.name, NOT_SERVING)
        if not await self._bring_up(model):
            await self.models.remove(model.name, grace_s=0)
            await self.health.set(model.name, UNKNOWN)
            raise FailedPrecondition(f"model {model.name!r} could not be served: {model.error}")
        await self.health.set(model.name, SERVING)
        logger.info("model %s is serving (added at run time)", model.name)
        return model

    async def remove_model(self, name: str, *, grace_s: float) -> None:
        """Stop serving a model: refused at once to new calls (health NOT_SERVING), in-flight
        calls get `grace_s` to finish, then its engine stops and its name is free."""
        if any(m.name == name and m.deployment is None for m in self.models):
            await self.health.set(name, NOT_SERVING)
        await self.models.remove(name, grace_s=grace_s)
        await self.health.set(name, UNKNOWN)
        logger.info("model %s removed", name)

    def check_replicas(self) -> None:
        """Start the replicas' active health checks (once: they look at every deployment)."""
        if self._checks is None:
            checker = HealthChecker(self.models, self.metrics, self._publish)
            self._checks = asyncio.get_running_loop().create_task(checker.run())

    async def add_deployment(self, model: ModelConfig, dep: DeploymentConfig) -> ServedModel:
        """Serve one more deployment, without a restart: listed (NOT_SERVING), its tokenizer
        and routed engine loaded, then each replica loaded and warmed up into rotation. Returns
        once every replica has loaded or failed; when none could, it is removed again (nothing
        left behind) and FailedPrecondition names each replica's error."""
        shell = self.models.add_deployment(model, dep)
        await self.health.set(shell.name, NOT_SERVING)
        if await self._bring_up(shell):
            for replica in shell.replicas:
                await self._load_replica(shell, replica)
        if not any(r.error == "" and r.loaded for r in shell.replicas):
            errors = "; ".join(f"{r.name}: {r.error}" for r in shell.replicas) or shell.error
            await self.models.remove_deployment(shell.name, grace_s=0)
            await self.health.set(shell.name, UNKNOWN)
            raise FailedPrecondition(f"deployment {shell.name!r} could not be served: {errors}")
        self.check_replicas()
        await self._publish(shell)
        logger.info(
            "deployment %s is serving (%d of %d replicas healthy)",
            shell.name,
            sum(r.error == "" for r in shell.replicas),
            len(shell.replicas),
        )
        return shell

    async def add_replicas(
        self, name: str, added: tuple[ReplicaConfig, ...], model: ModelConfig | None = None
    ) -> list[ServedModel]:
        """Scale a deployment up (with replicas of `model`, when given): the new replicas
        join its rotation as each has loaded; returns them (their `error` says which failed)."""
        shell = next(m for m in self.models if m.name == name)
        new = self.models.add_replicas(name, added, model)
        for replica in new:
            await self._load_replica(shell, replica)
        await self._publish(shell)
        return new

    async def remove_replicas(self, name: str, names: set[str], *, grace_s: float) -> None:
        """Scale a deployment down: the replicas leave rotation, drain, then stop."""
        await self.models.remove_replicas(name, names, grace_s=grace_s)
        shell = next(m for m in self.models if m.name == name)
        await self._publish(shell)

    async def remove_deployment(self, name: str, *, grace_s: float) -> None:
        """Stop serving a deployment: refused to new calls at once, in-flight calls get
        `grace_s`, then its replicas stop and its name is free."""
        await self.health.set(name, NOT_SERVING)
        await self.models.remove_deployment(name, grace_s=grace_s)
        await self.health.set(name, UNKNOWN)
        logger.info("deployment %s removed", name)

    async def _load_replica(self, deployment: ServedModel, replica: ServedModel) -> None:
        """Load one replica and put it into rotation once a warm-up call went through; a remote
        replica that does not answer yet is left to the health checks."""
        assert deployment.deployment is not None and replica.replica is not None
        dispatcher = self.models.dispatcher
        assert dispatcher is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.models.load, replica)
            self.models.start(replica)
        except Exception as exc:
            replica.ready = False
            replica.error = f"{type(exc).__name__}: {exc}"
            logger.exception("replica %s failed to load", replica.name)
            return
        try:
            await loader.warm_up(replica, self.models.next_engine_id())
        except Exception as exc:
            replica.ready = False
            replica.error = f"warm-up failed: {type(exc).__name__}: {exc}"
            logger.warning("replica %s is out of rotation: %s", replica.name, replica.error)
            return
        if deployment.config.kind == "embed" and deployment.dimension != replica.dimension:
            if deployment.dimension:
                # Its vectors would not be comparable with the others'.
                replica.ready = False
                replica.error = (
                    f"it gives {replica.dimension}-dimensional vectors; the deployment's are "
                    f"{deployment.dimension}-dimensional"
                )
                logger.warning("replica %s is out of rotation: %s", replica.name, replica.error)
                return
            deployment.dimension = replica.dimension  # a remote server's, learned at warm-up
        replica.error = ""
        dispatcher.set_healthy(deployment.name, replica.replica.name, True)

    async def reload_routing(self, routing: RoutingConfig) -> list[str]:
        """Apply a new routing config to the running router (see ServedModels.reload_routing)
        and republish the deployments' health; returns what changed."""
        changes = self.models.reload_routing(routing)
        await self._publish_all()
        return changes

    def routing_changed(self) -> None:
        """A breaker changed state: republish the deployments' health (once per burst)."""
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.get_running_loop().create_task(self._publish_all())

    async def _publish_all(self) -> None:
        for model in self.models:
            if model.deployment is not None:
                await self._publish(model)

    async def _publish(self, deployment: ServedModel) -> None:
        """A deployment's health: SERVING while a replica of it, or of a fallback, would take
        a call."""
        dispatcher = self.models.dispatcher
        assert dispatcher is not None
        health = dispatcher.health()
        serving = deployment.ready and any(
            health[name].serving for name in dispatcher.chain(deployment.name)
        )
        await self.health.set(deployment.name, SERVING if serving else NOT_SERVING)

"""Deployments created, scaled and deleted at run time: each change checked against the
registry (the version exists, is active, its artifact unchanged; the context limit within the
version's), applied to the running router (router.server: load → warm up → serve, drain →
stop), and stored, so that a restart brings every deployment back (`restore`).

A change is applied before it is stored, and undone when storing fails: a deployment that could
not be served, or not recorded, leaves nothing behind (no replica, no row). Changes to one
deployment run one at a time in this process; across processes the registry's generations
decide (ABORTED for the loser).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from router.config import REMOTE_BACKENDS, ModelConfig
from router.control import resources
from router.control.access import DeploymentAccess
from router.control.rollout import (
    RolloutRunner,
    same_tokenizer,
    target_replicas,
    with_weights,
)
from router.control.served_config import (
    check_secrets,
    model_config,
    needs_preparing,
    prepare_gguf,
    replica_config,
    routing_config,
)
from router.control.usage import Pricing, UsageRecorder
from router.errors import Aborted, FailedPrecondition, InvalidArgument, quote
from router.registry import deployments as spec
from router.registry.artifacts import verify_unchanged
from router.registry.database import call
from router.registry.deployments import (
    Deployment,
    DeploymentStore,
    ReplicaSpec,
    Rollout,
    check_rollout,
)
from router.registry.model_versions import ModelVersion
from router.registry.version_store import ModelVersionStore
from router.serving.model import ServedModel

if TYPE_CHECKING:
    from router.guard.limits.limiter import RateLimiter
    from router.serving.lifecycle import Lifecycle

logger = logging.getLogger(__name__)

DRAIN_GRACE_S = 30.0
"""How long a removed replica's (or deployment's) calls in flight may take to finish."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaStatus:
    name: str
    ready: bool
    error: str


def _pricing(version: ModelVersion) -> Pricing:
    return Pricing(
        version.name,
        version.version,
        version.input_price_per_1k,
        version.output_price_per_1k,
        version.currency,
    )


class DeploymentController:
    """The control plane's deployments, applied to one router."""

    def __init__(
        self,
        serving: Lifecycle,
        model_cache: Path,
        versions: ModelVersionStore,
        store: DeploymentStore,
        usage: UsageRecorder,
        *,
        guarded: bool = False,
        guard_limiter: RateLimiter | None = None,
    ) -> None:
        """`guarded`: the guard authenticates callers; `guard_limiter`: its rate limiter, whose
        Redis deployments' own limits share."""
        self._serving = serving
        self._guarded = guarded
        self._guard_limiter = guard_limiter
        self._model_cache = model_cache
        self._versions = versions
        self.store = store
        self._usage = usage
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.rollouts = RolloutRunner(serving, store, self.lock, self._rolled_out)
        self.rollouts.changed = self.applied
        self.failed: dict[str, str] = {}
        """Stored deployments this router could not bring back at start, and why."""
        self.generations: dict[str, int] = {}
        """The generation of each deployment this router serves as stored (the reconciler
        applies what differs)."""
        self.owner = ""
        """This router as rollouts name their owner ('host:port'; set when it has bound)."""

    def lock(self, name: str) -> asyncio.Lock:
        """Changes to one deployment in this router run one at a time."""
        return self._locks[name]

    def applied(self, d: Deployment) -> None:
        """This router serves `d` as stored."""
        self.generations[d.name] = d.generation
        self._usage.set_replica_versions(
            d.name, {r.name: r.model_version or d.model_version for r in d.replicas}
        )

    async def version_of(self, d: Deployment) -> tuple[ModelVersion, ModelConfig]:
        version = await call(self._versions.get, d.model_name, d.model_version)
        model = model_config(version, d)
        # A package, a prepared folder or a GGUF must still be what was registered.
        await asyncio.to_thread(verify_unchanged, version.artifact)
        if needs_preparing(version):
            await asyncio.to_thread(prepare_gguf, version, self._model_cache)
        return version, model

    def bill(self, name: str, version: ModelVersion) -> None:
        """Calls to `name` are metered at `version`'s prices from now on."""
        self._usage.set_pricing(name, _pricing(version))

    def bill_also(self, name: str, version: ModelVersion) -> None:
        """Calls `name`'s replicas of `version` serve (a rollout's target) are metered at its
        prices."""
        self._usage.add_pricing(name, _pricing(version))

    async def create(self, d: Deployment, actor: str) -> Deployment:
        """Serve `d` and store it; it serves on return (some replicas may have failed)."""
        spec.validate(d)
        if (d.require_auth or d.limits) and not self._guarded:
            raise FailedPrecondition(
                "deployment.require_auth and deployment.limits need the router's guard: turn "
                "on guard.auth (API keys or JWTs) in its config"
            )
        async with self.lock(d.name):
            version, model = await self.version_of(d)
            self._check_fits(model, d.replicas)
            await self._serving.add_deployment(model, routing_config(d))
            try:
                stored = await call(self.store.insert, d, actor)
            except BaseException:
                await self._serving.remove_deployment(d.name, grace_s=0)
                raise
            self.bill(d.name, version)
            self.set_access(d)
            self.applied(stored)
            return stored

    async def scale(
        self, name: str, count: int, actor: str, *, expected_generation: int = 0
    ) -> Deployment:
        """Run `count` replicas: new ones copy the first replica's settings (named r1, r2...),
        removed ones (the last) leave rotation, drain, then stop."""
        if not 1 <= count <= spec.MAX_REPLICAS:
            raise InvalidArgument(
                f"replica_count={count} must be in [1, {spec.MAX_REPLICAS}]", field="replica_count"
            )
        async with self.lock(name):
            current = await call(self.store.get, name)
            self._check_generation(current, expected_generation)
            self._check_no_rollout(current)
            replicas = list(current.replicas)
            taken = {r.name for r in replicas}
            template = replicas[0]
            i = 1
            while len(replicas) < count:
                while f"r{i}" in taken:
                    i += 1
                replicas.append(dataclasses.replace(template, name=f"r{i}"))
                taken.add(f"r{i}")
            kept, removed = replicas[:count], replicas[count:]
            served = self.served(name)
            if served is not None:
                fresh = [r for r in kept if r not in current.replicas]
                self._check_fits(dataclasses.replace(served.config, name=name), fresh)
            changed = dataclasses.replace(current, replicas=tuple(kept))
            stored = await call(self.store.replace, current, changed, actor, "deployment.scale")
            self.applied(stored)
            added = tuple(replica_config(r) for r in kept if r not in current.replicas)
            if added:
                await self._serving.add_replicas(name, added)
            if removed:
                await self._serving.remove_replicas(
                    name, {r.name for r in removed}, grace_s=DRAIN_GRACE_S
                )
            return stored

    async def delete(self, name: str, actor: str, *, grace_s: float = DRAIN_GRACE_S) -> None:
        """Stop serving `name` (its calls in flight get `grace_s`) and forget it."""
        async with self.lock(name):
            await call(self.store.get, name)  # NotFound before anything stops
            await self.rollouts.cancel(name)
            await self._serving.remove_deployment(name, grace_s=grace_s)
            await call(self.store.delete, name, actor)
            self.generations.pop(name, None)
            self._usage.set_pricing(name, None)
            self.failed.pop(name, None)

    async def forget(self, name: str, *, grace_s: float) -> None:
        """Stop serving `name` here (its row is gone: deleted through another router)."""
        await self.rollouts.cancel(name)
        await self._serving.remove_deployment(name, grace_s=grace_s)
        self.generations.pop(name, None)
        self._usage.set_pricing(name, None)

    async def get(self, name: str) -> Deployment:
        return await call(self.store.get, name)

    async def all(self) -> list[Deployment]:
        return await call(self.store.all)

    def status(self, d: Deployment) -> list[ReplicaStatus]:
        """Each replica as this router serves it now."""
        shell = self.served(d.name)
        if shell is None:
            why = self.failed.get(d.name, "not served by this router")
            return [ReplicaStatus(r.name, False, why) for r in d.replicas]
        return [
            ReplicaStatus(r.replica.name if r.replica else r.name, r.ready and not r.error, r.error)
            for r in shell.replicas
        ]

    def _check_fits(self, model: ModelConfig, replicas: Iterable[ReplicaSpec]) -> None:
        """ResourceExhausted when the local ones of `replicas` would not fit in memory;
        FailedPrecondition for a replica a version with no local artifact cannot have."""
        replicas = list(replicas)
        check_secrets(replicas)
        for r in replicas:
            if model.passthrough and r.backend != "openai_http":
                raise FailedPrecondition(
                    f"replica {quote(r.name)} has backend {quote(r.backend or 'onnxruntime')}: "
                    "this version has no local artifact, so its replicas are OpenAI-compatible "
                    "servers (backend 'openai_http' and their url)"
                )
        local = sum(r.backend not in REMOTE_BACKENDS for r in replicas)
        if local:
            model_dir = self._model_cache / model.artifact
            resources.check_fits(self._serving.models, model, model_dir, local)

    def served(self, name: str) -> ServedModel | None:
        return next(
            (m for m in self._serving.models if m.name == name and m.deployment is not None), None
        )

    async def rollout(
        self,
        name: str,
        r: Rollout,
        actor: str,
        *,
        expected_generation: int = 0,
        template: ReplicaSpec | None = None,
    ) -> Deployment:
        """Start moving `name` to r.target_version: its replicas load (as many as the
        deployment has, shaped like its first) and take the first step's share; the steps
        run in the background (RolloutRunner). Returns the deployment as the rollout starts."""
        check_rollout(r)
        async with self.lock(name):
            current = await call(self.store.get, name)
            self._check_generation(current, expected_generation)
            self._check_no_rollout(current)
            if r.target_version == current.model_version:
                raise FailedPrecondition(
                    f"deployment {quote(name)} already serves version {quote(r.target_version)}"
                )
            shell = self.served(name)
            if shell is None:
                raise FailedPrecondition(f"deployment {quote(name)} is not served by this router")
            if shell.config.kind == "embed":
                raise FailedPrecondition(
                    f"deployment {quote(name)} embeds: vectors of two model versions are not "
                    "comparable, so a traffic split would mix them in one collection or cache; "
                    "deploy the new version under a new name and embed the texts again"
                )
            target = dataclasses.replace(current, model_version=r.target_version)
            target_version, model = await self.version_of(target)
            if model.passthrough != shell.config.passthrough:
                raise FailedPrecondition(
                    f"version {quote(r.target_version)} and {quote(current.model_version)} differ "
                    "in having a local artifact: calls to one are tokenized by the router, to "
                    "the other by its server; deploy it under a new name"
                )
            differs = same_tokenizer(
                self._model_cache / shell.config.artifact, self._model_cache / model.artifact
            )
            if differs:
                raise FailedPrecondition(
                    f"version {quote(r.target_version)} tokenizes differently from "
                    f"{quote(current.model_version)} ({differs}); one deployment tokenizes a "
                    "call once, so roll out versions of the same tokenizer (another engine, "
                    "quantization or device), or deploy it under a new name"
                )
            added = target_replicas(current, r.target_version, template)
            spec.validate(dataclasses.replace(current, replicas=(*current.replicas, *added)))
            self._check_fits(model, added)
            first = dataclasses.replace(
                current,
                replicas=(*current.replicas, *added),
                rollout=dataclasses.replace(
                    r,
                    from_version=current.model_version,
                    state="running",
                    step=0,
                    reason="",
                    owner=self.owner,
                ),
            )
            first = with_weights(first)  # the first step's shares, stored with the replicas
            share = {x.name: x.weight for x in first.replicas}
            new = tuple(x for x in first.replicas if x.model_version == r.target_version)
            self.bill_also(name, target_version)  # its replicas bill at its prices
            loaded = await self._serving.add_replicas(
                name, tuple(replica_config(x) for x in new), dataclasses.replace(model, name=name)
            )
            if not any(x.error == "" and x.loaded for x in loaded):
                await self._serving.remove_replicas(name, {x.name for x in added}, grace_s=0)
                errors = "; ".join(f"{x.name}: {x.error}" for x in loaded)
                raise FailedPrecondition(
                    f"version {quote(r.target_version)} could not load: {errors}"
                )
            self._serving.models.set_weights(name, share)
            try:
                stored = await call(self.store.replace, current, first, actor, "deployment.rollout")
            except BaseException:
                self._serving.models.set_weights(name, {x.name: 1.0 for x in current.replicas})
                await self._serving.remove_replicas(name, {x.name for x in added}, grace_s=0)
                raise
        self.applied(stored)
        self.rollouts.start(name)
        return stored

    def set_access(self, d: Deployment) -> None:
        """`d`'s own authentication and limits; unchanged rules keep their counters (a scale,
        a rollout step or another router's change must not reset a tenant's limits)."""
        access = self._serving.models.access
        current = access.get(d.name)
        if current is not None and current.same_rules(d.require_auth, d.limits):
            return
        if d.require_auth or d.limits:
            access[d.name] = DeploymentAccess(
                d.name, d.require_auth, d.limits, guard_limiter=self._guard_limiter
            )
        else:
            access.pop(d.name, None)

    async def _rolled_out(self, d: Deployment) -> None:
        """A rollout completed: the deployment's own model and prices are the target's now."""
        version, model = await self.version_of(d)
        self._serving.models.set_model(d.name, model)
        self.bill(d.name, version)

    def _check_no_rollout(self, d: Deployment) -> None:
        if self.rollouts.running(d.name) or (
            d.rollout is not None and d.rollout.state == "running"
        ):
            raise FailedPrecondition(
                f"deployment {quote(d.name)} is rolling out to version "
                f"{quote(d.rollout.target_version if d.rollout else '?')}; wait for it to end"
            )

    @staticmethod
    def _check_generation(current: Deployment, expected: int) -> None:
        if expected and current.generation != expected:
            raise Aborted(
                f"deployment {quote(current.name)} is at generation {current.generation}, not "
                f"{expected}; read it again and retry"
            )

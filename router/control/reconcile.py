"""Routers sharing one registry converge on what it holds: each compares the deployments'
generations with what it serves, about once a second, and applies what differs — a deployment
created, scaled, rolled out or deleted through another router is served here the same way
within a second or two, with no restart.

Polling the generations is one small indexed query a second per router on SQLite and
PostgreSQL alike (PostgreSQL's LISTEN/NOTIFY would save the query but needs a connection held
open per router, and SQLite has no such thing). A database that cannot be reached leaves
serving as it is until it is back. A rollout is run by the router that started it (its
owner); the others mirror the replicas and weights it stores. Every router writes a heartbeat
every BEAT_S (router.registry.routers); when a rollout's owner has written none for
TAKEOVER_S, the first router to notice takes the rollout over (stored with the deployment's
generation, so one router wins) and runs it on from its current step, judging that step
afresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from router.control.rollout import SYSTEM, interrupted
from router.control.served_config import check_secrets, replica_config, routing_config
from router.errors import Aborted, RouterError
from router.registry.database import call
from router.registry.deployments import Deployment
from router.registry.routers import RouterBook

if TYPE_CHECKING:
    from router.control.deployments import DeploymentController
    from router.serving.lifecycle import Lifecycle

logger = logging.getLogger(__name__)

INTERVAL_S = 1.0
DRAIN_GRACE_S = 30.0
BEAT_S = 3.0
"""How often a router writes its heartbeat (a write, so not every second: a laptop's lone
router would sync its SQLite file forever)."""
TAKEOVER_S = 10.0
"""A rollout whose owner has not been seen for this long (three missed beats) is taken over."""


class Reconciler:
    """Applies the registry's deployments to one router."""

    def __init__(
        self, control: DeploymentController, serving: Lifecycle, routers: RouterBook
    ) -> None:
        self._control = control
        self._serving = serving
        self._routers = routers
        self._mirrored: dict[str, tuple[str, float]] = {}
        """Deployments whose rollout another router runs: that router, and when it last stored
        the deployment (a sign of life before its first heartbeat)."""

    async def restore(self) -> None:
        """Bring back every stored deployment (at start, after the config's models); a rollout
        this router ran before it restarted is rolled back first. One that cannot be served
        is logged and reported by `status`; the others serve."""
        control = self._control
        for d in await call(control.store.all):
            async with control.lock(d.name):
                try:
                    if d != (back := interrupted(d, control.owner)):
                        d = await call(
                            control.store.replace, d, back, SYSTEM, "deployment.rollback"
                        )
                        logger.warning("deployment %s: its rollout was rolled back", d.name)
                    await self.apply(d)
                except RouterError as exc:
                    control.failed[d.name] = str(exc)
                    logger.error("deployment %s could not be restored: %s", d.name, exc)

    async def run(self) -> None:
        """Reconcile every INTERVAL_S, and beat every BEAT_S, until cancelled."""
        beaten = float("-inf")
        while True:
            try:
                if time.monotonic() - beaten >= BEAT_S:
                    await call(self._routers.beat, self._control.owner, time.time())
                    beaten = time.monotonic()
                await self.once()
                await self.take_over()
            except RouterError as exc:  # the database is away: serve on as it is
                logger.debug("reconciling deployments skipped: %s", exc)
            except Exception:
                logger.exception("reconciling deployments failed")
            await asyncio.sleep(INTERVAL_S)

    async def take_over(self) -> None:
        """Run the rollouts whose owner has written no heartbeat for TAKEOVER_S."""
        if not self._mirrored:
            return
        seen = await call(self._routers.last_seen)
        now = time.time()
        control = self._control
        for name, (owner, stored_at) in sorted(self._mirrored.items()):
            silent = now - max(seen.get(owner, 0.0), stored_at)
            if silent < TAKEOVER_S or control.rollouts.running(name):
                continue
            async with control.lock(name):
                d = await call(control.store.get, name)
                r = d.rollout
                if r is None or r.state != "running" or r.owner != owner:
                    continue  # ended, or taken over already: the next apply follows it
                why = f"taken over from {owner}: not seen for {silent:.0f} s"
                mine = dataclasses.replace(r, owner=control.owner, reason=why)
                try:
                    stored = await call(
                        control.store.replace,
                        d,
                        dataclasses.replace(d, rollout=mine),
                        SYSTEM,
                        "deployment.rollout_takeover",
                    )
                except Aborted:
                    continue  # another router took it first
                logger.warning("deployment %s: rollout to %s %s", name, r.target_version, why)
                await self.apply(stored)
            control.rollouts.start(name)

    async def once(self) -> None:
        control = self._control
        stored = await call(control.store.generations)
        for name in sorted(set(control.generations) - set(stored)):
            async with control.lock(name):
                if name in control.generations and control.served(name) is not None:
                    logger.info("deployment %s was deleted elsewhere: removing it", name)
                    await control.forget(name, grace_s=DRAIN_GRACE_S)
        for name, generation in sorted(stored.items()):
            if control.generations.get(name) == generation or control.rollouts.running(name):
                continue
            if name in control.failed:
                continue  # reported by status; an admin deletes or fixes it
            async with control.lock(name):
                d = await call(control.store.get, name)
                if control.generations.get(name) == d.generation:
                    continue
                try:
                    await self.apply(d)
                except RouterError as exc:
                    control.failed[name] = str(exc)
                    logger.error("deployment %s could not be applied: %s", name, exc)

    async def apply(self, d: Deployment) -> None:
        """Serve `d` as stored: create it, or add and remove replicas and set their weights."""
        control, models = self._control, self._serving.models
        check_secrets(d.replicas)  # a replica's API key must be in this router's environment too
        version, model = await control.version_of(d)
        own = [r for r in d.replicas if r.model_version in ("", d.model_version)]
        others = [r for r in d.replicas if r not in own]
        shell = control.served(d.name)
        if shell is None:
            logger.info("deployment %s was created elsewhere: serving it", d.name)
            await self._serving.add_deployment(
                model, routing_config(dataclasses.replace(d, replicas=tuple(own)))
            )
            current: set[str] = {r.name for r in own}
        else:
            current = {r.replica.name for r in shell.replicas if r.replica is not None}
            models.set_model(d.name, model)
        desired = {r.name for r in d.replicas}
        gone = current - desired
        if gone:
            await self._serving.remove_replicas(d.name, gone, grace_s=DRAIN_GRACE_S)
        for version_name in sorted({r.model_version or d.model_version for r in d.replicas}):
            missing = [
                r
                for r in (own if version_name == d.model_version else others)
                if r.name not in current and (r.model_version or d.model_version) == version_name
            ]
            if not missing:
                continue
            target = dataclasses.replace(d, model_version=version_name)
            other_version, replica_model = await control.version_of(target)
            if version_name != d.model_version:
                control.bill_also(d.name, other_version)  # a rollout's target: its own prices
            await self._serving.add_replicas(
                d.name,
                tuple(replica_config(r) for r in missing),
                dataclasses.replace(replica_model, name=d.name),
            )
        models.set_weights(d.name, {r.name: r.weight for r in d.replicas})
        control.bill(d.name, version)
        control.set_access(d)
        control.applied(d)
        r = d.rollout
        if r is not None and r.state == "running" and r.owner not in ("", control.owner):
            self._mirrored[d.name] = (r.owner, d.updated_at)
        else:
            self._mirrored.pop(d.name, None)

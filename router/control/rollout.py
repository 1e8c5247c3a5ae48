"""Rolling a deployment out to another version of its model: the target's replicas take a
growing share of the traffic (10% → 50% → 100% by default), each step judged after its interval
by the target's error rate and 95th percentile time to first token over that step
(router/routing/replica_stats.py). A step that fails rolls back at once: the target's replicas
leave rotation, drain and stop, and every call goes to the old version again. After the last
step the old replicas drain and stop, and the deployment serves the target version.

Both versions must tokenize alike (one deployment tokenizes a call once, before a replica is
picked): same tokenizer and chat template, another engine, quantization or device. Each change
is stored (the deployment's generation grows) and audited; a rollout interrupted by a restart
is rolled back when the router comes up again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from router.models.prepare import MANIFEST, read_manifest
from router.registry.database import call
from router.registry.deployments import Deployment, DeploymentStore, ReplicaSpec, Rollout
from router.routing.replica_stats import Window

if TYPE_CHECKING:
    from router.serving.lifecycle import Lifecycle

logger = logging.getLogger(__name__)

SYSTEM = "rollout"
"""The actor of the changes a rollout makes by itself (steps, rollback, completion)."""
IDLE_WEIGHT = 1e-6
"""Weight of the old replicas at the 100% step: in rotation (a weight must be > 0) but idle."""
DRAIN_GRACE_S = 30.0


def same_tokenizer(a: Path, b: Path) -> str:
    """'' when prepared folders `a` and `b` tokenize and render chats alike; else what differs."""
    if a == b:
        return ""
    for name in ("tokenizer.json",):
        try:
            if (a / name).read_bytes() != (b / name).read_bytes():
                return f"their {name} differ"
        except OSError as exc:
            return f"{name} cannot be read: {exc}"
    ma, mb = read_manifest(a) or {}, read_manifest(b) or {}
    for key in ("chat_template", "bos_token_id", "eos_token_id", "stop_token_ids", "vocab_size"):
        if ma.get(key) != mb.get(key):
            return f"their {MANIFEST} {key} differ"
    return ""


def weights(d: Deployment, target: str, percent: int) -> dict[str, float]:
    """Replica weights giving the target's replicas `percent` of the traffic."""
    new = [r.name for r in d.replicas if r.model_version == target]
    old = [r.name for r in d.replicas if r.model_version != target]
    shares = {n: percent / len(new) for n in new}
    rest = 100 - percent
    shares.update({n: (rest / len(old) if rest else IDLE_WEIGHT) for n in old})
    return shares


def judge(r: Rollout, w: Window) -> str:
    """Why the step fails ('' when it passes)."""
    if r.min_calls and w.attempts < r.min_calls:
        return (
            f"only {w.attempts} call(s) reached version {r.target_version!r} in the "
            f"{r.steps[r.step]}% step; min_calls={r.min_calls}"
        )
    if w.attempts and w.error_rate > r.max_error_rate:
        return (
            f"version {r.target_version!r} failed {w.failures} of {w.attempts} attempts "
            f"({w.error_rate:.1%}) in the {r.steps[r.step]}% step; "
            f"max_error_rate={r.max_error_rate:.1%}"
        )
    if r.max_ttft_p95_s and w.ttft_p95_s > r.max_ttft_p95_s:
        return (
            f"version {r.target_version!r} had a TTFT p95 of {w.ttft_p95_s:.3f} s in the "
            f"{r.steps[r.step]}% step; max_ttft_p95_s={r.max_ttft_p95_s:g}"
        )
    return ""


class RolloutRunner:
    """Runs the rollouts of one router's deployments, one task each."""

    def __init__(
        self,
        serving: Lifecycle,
        store: DeploymentStore,
        lock: Callable[[str], asyncio.Lock],
        completed: Callable[[Deployment], Awaitable[None]],
    ) -> None:
        self._serving = serving
        self._store = store
        self._lock = lock
        self._completed = completed
        """Told of a deployment that now serves its rollout's target (metering, model)."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.changed: Callable[[Deployment], None] = lambda stored: None
        """Told of each change a rollout stores (the controller notes its generation)."""

    def start(self, name: str) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(self._run(name))

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        for name in list(self._tasks):
            await self.cancel(name)

    async def _run(self, name: str) -> None:
        try:
            while await self._step(name):
                pass
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("rollout of %s stopped on an error", name)

    async def _step(self, name: str) -> bool:
        """Run and judge the current step; True when another step follows."""
        d = await call(self._store.get, name)
        r = d.rollout
        if r is None or r.state != "running":
            return False
        target = [x.name for x in d.replicas if x.model_version == r.target_version]
        # The step's shares as stored (with_weights), which the other routers apply too.
        self._serving.models.set_weights(name, {x.name: x.weight for x in d.replicas})
        stats = self._serving.models.stats
        start, at = stats.snapshot(name, target), time.monotonic()
        await asyncio.sleep(r.step_interval_s)
        window = stats.since(name, target, start, at)
        verdict = judge(r, window)
        async with self._lock(name):
            d = await call(self._store.get, name)
            if d.rollout != r:  # changed meanwhile (deleted, or a newer rollout)
                return False
            if verdict:
                await self._roll_back(d, r, verdict)
                return False
            seen = (
                f"{r.steps[r.step]}% step passed: {window.attempts} attempts, "
                f"{window.failures} failed, TTFT p95 {window.ttft_p95_s:.3f} s"
            )
            if r.step + 1 < len(r.steps):
                rollout = dataclasses.replace(r, step=r.step + 1, reason=seen)
                changed = with_weights(dataclasses.replace(d, rollout=rollout))
                stored = await call(
                    self._store.replace, d, changed, SYSTEM, "deployment.rollout_step"
                )
                logger.info("deployment %s: %s; now %d%%", name, seen, rollout.steps[rollout.step])
                self.changed(stored)
                return True
            await self._complete(d, r, seen)
            return False

    async def _roll_back(self, d: Deployment, r: Rollout, why: str) -> None:
        target = {x.name for x in d.replicas if x.model_version == r.target_version}
        kept = tuple(dataclasses.replace(x, weight=1.0) for x in d.replicas if x.name not in target)
        self._serving.models.set_weights(d.name, {x.name: 1.0 for x in kept})
        await self._serving.remove_replicas(d.name, target, grace_s=DRAIN_GRACE_S)
        rollout = dataclasses.replace(r, state="rolled_back", reason=why)
        changed = dataclasses.replace(d, replicas=kept, rollout=rollout)
        stored = await call(self._store.replace, d, changed, SYSTEM, "deployment.rollback")
        logger.warning("deployment %s rolled back to version %s: %s", d.name, r.from_version, why)
        self.changed(stored)

    async def _complete(self, d: Deployment, r: Rollout, seen: str) -> None:
        old = {x.name for x in d.replicas if x.model_version != r.target_version}
        kept = tuple(
            dataclasses.replace(x, weight=1.0, model_version="")
            for x in d.replicas
            if x.name not in old
        )
        self._serving.models.set_weights(d.name, {x.name: 1.0 for x in kept})
        await self._serving.remove_replicas(d.name, old, grace_s=DRAIN_GRACE_S)
        rollout = dataclasses.replace(r, state="completed", reason=seen)
        changed = dataclasses.replace(
            d, model_version=r.target_version, replicas=kept, rollout=rollout
        )
        stored = await call(self._store.replace, d, changed, SYSTEM, "deployment.rollout_done")
        await self._completed(stored)
        logger.info("deployment %s now serves version %s", d.name, r.target_version)
        self.changed(stored)


def with_weights(d: Deployment) -> Deployment:
    """The deployment with its replicas' weights for its running rollout's current step
    (stored, so that every router sharing the registry splits the traffic alike)."""
    r = d.rollout
    if r is None or r.state != "running":
        return d
    shares = weights(d, r.target_version, r.steps[r.step])
    replicas = tuple(dataclasses.replace(x, weight=shares[x.name]) for x in d.replicas)
    return dataclasses.replace(d, replicas=replicas)


def interrupted(d: Deployment, owner: str) -> Deployment:
    """A deployment whose rollout this router (`owner`) ran before it restarted, rolled back:
    the old replicas only. Another router's rollout is left to it."""
    r = d.rollout
    if r is None or r.state != "running" or r.owner not in ("", owner):
        return d
    kept = tuple(
        dataclasses.replace(x, weight=1.0)
        for x in d.replicas
        if x.model_version != r.target_version
    )
    rollout = dataclasses.replace(r, state="rolled_back", reason="interrupted by a restart")
    return dataclasses.replace(d, replicas=kept, rollout=rollout)


def target_replicas(
    d: Deployment, target: str, template: ReplicaSpec | None = None
) -> tuple[ReplicaSpec, ...]:
    """As many replicas for `target` as the deployment has, shaped like `template` (another
    backend or device, say) or else like its first replica; names continue r0, r1..."""
    taken = {r.name for r in d.replicas}
    template = template or d.replicas[0]
    found: list[ReplicaSpec] = []
    i = 0
    while len(found) < len(d.replicas):
        if f"r{i}" not in taken:
            found.append(dataclasses.replace(template, name=f"r{i}", model_version=target))
        i += 1
    return tuple(found)

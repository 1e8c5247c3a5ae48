"""Active health checks of deployments' replicas: each loaded replica is asked whether it is
ready every `interval_s` of its deployment, and leaves the rotation after `unhealthy_after`
failures in a row (returns after `healthy_after` passes).

Each check runs as its own task, so a replica that is slow to answer (busy, or hung until
`timeout_s`) does not delay the others'. A replica whose probe fails while it streams tokens to
a caller is busy, not dead, and stays.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from router.serving import embedding
from router.serving.catalog import Catalog
from router.serving.model import ServedModel
from router.telemetry import Metrics

logger = logging.getLogger(__name__)

CHECK_TICK_S = 1.0
"""Longest sleep between two looks at which replicas are due."""


class HealthChecker:
    def __init__(
        self,
        catalog: Catalog,
        metrics: Metrics,
        publish: Callable[[ServedModel], Awaitable[None]],
    ) -> None:
        self._catalog = catalog
        self._metrics = metrics
        self._publish = publish
        """Called with a deployment whenever one of its replicas enters or leaves rotation."""

    async def run(self) -> None:
        """Active health checks: ask each loaded replica whether it is ready, every
        deployment's interval, and take it out of rotation (or put it back) after the configured
        run of failures (or passes)."""
        runs: dict[str, int] = {}  # replica → passes (> 0) or failures (< 0) in a row
        due: dict[str, float] = {}
        # Each check runs as its own task: a replica that is slow to answer (busy, or hung until
        # timeout_s) must not delay the checks of the others.
        checking: dict[str, asyncio.Task[None]] = {}
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = loop.time()
                for deployment in self._catalog:
                    dc = deployment.deployment
                    if dc is None or not dc.health_check.enabled:
                        continue
                    for replica in deployment.replicas:
                        name = replica.name
                        if not replica.loaded or name in checking:
                            continue
                        if due.get(name, 0.0) > now:
                            continue
                        due[name] = now + dc.health_check.interval_s
                        task = loop.create_task(self.check_one(deployment, replica, runs))
                        checking[name] = task
                        task.add_done_callback(functools.partial(_forget, checking, name))
                await asyncio.sleep(min(CHECK_TICK_S, *self._intervals()))
        finally:
            for task in list(checking.values()):
                task.cancel()

    async def check_one(
        self, deployment: ServedModel, replica: ServedModel, runs: dict[str, int]
    ) -> None:
        """One health check of one replica, and what follows from it."""
        dispatcher = self._catalog.dispatcher
        dc = deployment.deployment
        assert dispatcher is not None and dc is not None
        assert replica.replica is not None
        hc = dc.health_check
        engine = replica.engine
        started = time.monotonic()
        try:
            async with asyncio.timeout(hc.timeout_s):
                if engine is not None:
                    ok = await engine.ready(hc.timeout_s)
                else:
                    ok = await _embeds(deployment, replica)
        except Exception:  # a probe that raises or times out failed
            ok = False
        if deployment.draining or replica not in deployment.replicas:
            return  # removed while it was probed: its verdict must not bring it back
        if not ok and engine is not None and engine.last_output_at > started:
            # Busy, not dead: it streamed to a caller while the probe waited (a llama.cpp server
            # answers its model list only between two generations, and must not leave the
            # rotation while it answers a long one).
            ok = True
        result = "pass" if ok else "fail"
        self._metrics.health_checks.labels(dc.name, replica.replica.name, result).inc()
        run = runs.get(replica.name, 0)
        run = max(run, 0) + 1 if ok else min(run, 0) - 1
        runs[replica.name] = run
        was = replica.ready
        if ok and run >= hc.healthy_after:
            replica.ready = True
            replica.error = ""
        elif not ok and -run >= hc.unhealthy_after:
            replica.ready = False
            replica.error = f"failed {-run} health check(s) in a row"
        if replica.ready != was:
            dispatcher.set_healthy(dc.name, replica.replica.name, replica.ready)
            logger.warning(
                "replica %s is %s rotation (%s)",
                replica.name,
                "back in" if replica.ready else "out of",
                replica.error or "health checks pass",
            )
            await self._publish(deployment)

    def _intervals(self) -> list[float]:
        return [
            m.deployment.health_check.interval_s
            for m in self._catalog
            if m.deployment is not None and m.deployment.health_check.enabled
        ] or [CHECK_TICK_S]


async def _embeds(deployment: ServedModel, replica: ServedModel) -> bool:
    """An embedding replica's probe: it embeds a text, into vectors of the deployment's
    dimension (a server that came back serving another model must stay out)."""
    vectors = await embedding.embed_pieces(replica, embedding.encode_texts(replica, ["ping"]))
    return int(vectors.shape[1]) == (deployment.dimension or int(vectors.shape[1]))


def _forget(checking: dict[str, asyncio.Task[None]], name: str, _: asyncio.Task[None]) -> None:
    """Done callback of a health check: the replica may be checked again."""
    checking.pop(name, None)

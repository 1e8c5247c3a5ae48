"""The routing topology: deployments, their replicas' run-time state, aliases, task routes and
fallback chains, built from a validated `RoutingConfig` and rebuilt in place when it changes.

`Dispatcher` (router.routing.dispatch) is a topology that also runs calls; health checks,
ListModels and the catalog read and steer it through the methods here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from router.errors import InvalidArgument, NotFound, quote
from router.routing.balancer import Replica, WeightedSplit, make_balancer
from router.routing.breaker import BreakerState, CircuitBreaker
from router.routing.config import RoutingConfig
from router.routing.retry import RetryBudget, fallback_chain
from router.routing.state import DeploymentHealth, DeploymentState, ReplicaHealth

Clock = Callable[[], float]
BreakerListener = Callable[[str, BreakerState, BreakerState], None]


class Topology:
    """What the router knows of its deployments, and the one place that changes it."""

    def __init__(
        self,
        config: RoutingConfig,
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        on_breaker_change: BreakerListener | None = None,
    ) -> None:
        """`config` must be validated. `clock` drives breakers and retry budgets;
        `on_breaker_change(name, old, new)` sees every breaker transition, name being
        'deployment/replica'."""
        self._rng = rng or random.Random()
        self._clock = clock
        self._on_breaker_change = on_breaker_change
        self._deployments: dict[str, DeploymentState] = {}
        self._splits: dict[str, WeightedSplit] = {}
        self._tasks: dict[str, str] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self.reconfigure(config)

    def reconfigure(self, config: RoutingConfig) -> None:
        """Take a new routing config (a deployment scaled or added). A replica that keeps its
        deployment and name keeps its rotation state (`healthy`); one that also keeps its
        settings keeps its breaker and outstanding count, a deployment that
        keeps its retry settings keeps its budget; calls in flight finish where they are. The
        config must be validated."""
        old_replicas = {
            (r.deployment, r.name): r for d in self._deployments.values() for r in d.replicas
        }
        deployments: dict[str, DeploymentState] = {}
        for dc in config.deployments:
            replicas = []
            for rc in dc.replicas:
                old = old_replicas.get((dc.name, rc.name))
                if old is not None and old.config == rc and old.breaker.config == dc.breaker:
                    replica = old  # the same object: attempts in flight give back to it
                else:
                    breaker = CircuitBreaker(
                        dc.breaker,
                        name=f"{dc.name}/{rc.name}",
                        clock=self._clock,
                        on_change=self._on_breaker_change,
                    )
                    replica = Replica(rc, dc.name, breaker)
                    if old is not None:
                        replica.healthy = old.healthy  # health checks judged the same engine
                replicas.append(replica)
            previous = self._deployments.get(dc.name)
            budget = (
                previous.budget
                if previous is not None and previous.config.retry == dc.retry
                else RetryBudget(dc.retry, clock=self._clock)
            )
            balancer = make_balancer(dc.balancer, replicas, self._rng)
            deployments[dc.name] = DeploymentState(dc, tuple(replicas), balancer, budget)
        self._deployments = deployments
        self._splits = {alias: WeightedSplit(w) for alias, w in config.aliases.items()}
        self._tasks = dict(config.tasks)
        graph = {d.name: d.fallbacks for d in config.deployments}
        self._chains = {name: fallback_chain(graph, name) for name in graph}

    # ---- names ---------------------------------------------------------------------------

    def knows(self, name: str) -> bool:
        """Whether `name` is a deployment or an alias of this dispatcher."""
        return name in self._deployments or name in self._splits

    def resolve(self, name: str = "", *, task: str = "", key: str | None = None) -> str:
        """The deployment a call goes to first: `name` (alias or deployment) or, when empty, the
        route of `task`. An alias splits by weight: by `key` when given (a caller stays on one
        side of an A/B test), at random otherwise."""
        target = name
        if not target:
            if not task:
                raise InvalidArgument("set a model, or a task to route by", field="model")
            routed = self._tasks.get(task)
            if routed is None:
                raise NotFound(
                    f"task {quote(task)} has no route; tasks routed: {sorted(self._tasks)}"
                )
            target = routed
        split = self._splits.get(target)
        if split is not None:
            return split.pick_for_key(key) if key is not None else split.pick(self._rng)
        if target in self._deployments:
            return target
        known = sorted([*self._deployments, *self._splits])
        raise NotFound(
            f"model {quote(target)} is neither a deployment nor an alias; known: {known}"
        )

    def replica(self, deployment: str, name: str) -> Replica:
        """The run-time state of one replica (KeyError when unknown)."""
        for replica in self._deployments[deployment].replicas:
            if replica.name == name:
                return replica
        raise KeyError(f"{deployment}/{name}")

    def set_healthy(self, deployment: str, name: str, healthy: bool) -> bool:
        """Take a replica out of rotation or put it back; True when that changed something."""
        replica = self.replica(deployment, name)
        changed = replica.healthy != healthy
        replica.healthy = healthy
        return changed

    def chain(self, deployment: str) -> tuple[str, ...]:
        """The deployment then its fallbacks, in the order they are tried."""
        return self._chains[deployment]

    def health(self) -> dict[str, DeploymentHealth]:
        """Breaker state and load of every replica, for health checks, metrics and ListModels."""
        out = {}
        for name, deployment in self._deployments.items():
            replicas = tuple(
                ReplicaHealth(r.name, r.outstanding, r.breaker.snapshot(), r.healthy)
                for r in deployment.replicas
            )
            serving = any(r.healthy and r.breaker.allow() for r in deployment.replicas)
            out[name] = DeploymentHealth(serving, replicas)
        return out

"""Run-time state the dispatcher keeps (each deployment's replicas, balancer and retry budget;
each call's attempts, deadline and failures), what it reports of it (ReplicaHealth,
DeploymentHealth), and how a call that cannot be answered ends: the error naming why."""

from __future__ import annotations

from dataclasses import dataclass

from router.errors import DeadlineExceeded, Unavailable
from router.routing.balancer import Balancer, Replica
from router.routing.breaker import BreakerSnapshot, BreakerState
from router.routing.config import DeploymentConfig
from router.routing.retry import RetryBudget


class NoReplicaAvailable(Unavailable):
    """No replica of the deployment or of its fallbacks may take a call (breakers open, or all
    tried). `retry_after_s`: when the first open breaker lets a probe through."""

    def __init__(self, message: str, *, deployments: tuple[str, ...], retry_after_s: float):
        # A google.rpc.RetryInfo tells clients when to come back (1 s when no breaker will
        # half-open by itself: replicas out of rotation wait for their health checks).
        super().__init__(message, retry_after_s=retry_after_s or 1.0)
        self.deployments = deployments


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    name: str
    outstanding: int
    breaker: BreakerSnapshot
    healthy: bool
    """What the active health checks last concluded (False while not loaded)."""


@dataclass(frozen=True, slots=True)
class DeploymentHealth:
    serving: bool
    """Some replica would take a call now."""
    replicas: tuple[ReplicaHealth, ...]


class DeploymentState:
    """Run-time state of one deployment: its replicas (with breakers), balancer and budget."""

    __slots__ = ("balancer", "budget", "config", "replicas")

    def __init__(
        self,
        config: DeploymentConfig,
        replicas: tuple[Replica, ...],
        balancer: Balancer,
        budget: RetryBudget,
    ) -> None:
        self.config = config
        self.replicas = replicas
        self.balancer = balancer
        self.budget = budget


class CallState:
    """One call's progress across deployments: attempts so far and what failed."""

    __slots__ = ("attempts", "deadline", "failures", "key", "request_id", "timeout_s")

    def __init__(
        self, request_id: str, key: str | None, timeout_s: float | None, now: float
    ) -> None:
        self.request_id = request_id
        self.key = key
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else now + timeout_s
        self.attempts = 0
        self.failures: list[str] = []


def deadline_error(call: CallState) -> DeadlineExceeded:
    tried = f" ({'; '.join(call.failures)})" if call.failures else ""
    return DeadlineExceeded(
        f"the deadline of {call.timeout_s or 0:.3g}s passed after {call.attempts} attempt(s){tried}"
    )


def exhausted_error(
    first: str, chain: tuple[str, ...], deployments: list[DeploymentState], call: CallState
) -> Unavailable:
    """Why a call to `first` (whose fallback chain is `chain`) could not be answered: no
    replica available at all (NoReplicaAvailable, with when to come back), or every attempt
    failed (each named)."""
    also = f" nor of its fallbacks {list(chain[1:])}" if len(chain) > 1 else ""
    if call.attempts == 0:
        replicas = [r for d in deployments for r in d.replicas]
        waits = [r.breaker.snapshot().retry_in_s for r in replicas]
        states = ", ".join(replica_state(r) for r in replicas[:8])
        if len(replicas) > 8:
            states += f" and {len(replicas) - 8} more"
        return NoReplicaAvailable(
            f"no replica of deployment {first!r}{also} is available ({states})",
            deployments=chain,
            retry_after_s=min((w for w in waits if w > 0), default=0.0),
        )
    also = f" or its fallbacks {list(chain[1:])}" if len(chain) > 1 else ""
    return Unavailable(
        f"deployment {first!r}{also} could not answer after {call.attempts} attempt(s): "
        + "; ".join(call.failures)
    )


def replica_state(replica: Replica) -> str:
    snap = replica.breaker.snapshot()
    name = f"{replica.deployment}/{replica.name}"
    if not replica.healthy:
        return f"{name} failing its health checks"
    if snap.state is BreakerState.OPEN:
        return f"{name} open for {snap.retry_in_s:.1f}s more"
    if snap.state is BreakerState.HALF_OPEN:
        return f"{name} half-open (probe in flight)"
    return f"{name} closed"

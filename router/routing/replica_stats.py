"""Per-replica counts a rollout judges a version by: attempts, failed attempts and the time to
each streamed attempt's first item, kept in memory (the Prometheus series carry the same for
dashboards: irouter_routing_attempts, irouter_routing_failed_attempts and
irouter_replica_time_to_first_token_seconds)."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from router.routing.attempt import AttemptInfo
from router.telemetry import Metrics

TTFT_KEPT = 4096
"""First-token times kept per replica (the newest)."""


@dataclass(slots=True)
class ReplicaStats:
    attempts: int = 0
    failures: int = 0
    first_items: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=TTFT_KEPT))
    """(when, seconds) of each attempt's first item, by time.monotonic."""


@dataclass(frozen=True, slots=True)
class Window:
    """What some replicas did since a moment."""

    attempts: int
    failures: int
    ttft_p95_s: float
    """0 when no first item arrived."""

    @property
    def error_rate(self) -> float:
        return self.failures / self.attempts if self.attempts else 0.0


class ReplicaStatsBook:
    """The stats of every replica, fed by the dispatcher's hooks."""

    def __init__(self, metrics: Metrics) -> None:
        self._stats: dict[tuple[str, str], ReplicaStats] = {}
        self._ttft = metrics.replica_ttft
        self._children: dict[tuple[str, str], object] = {}

    def _of(self, info: AttemptInfo) -> ReplicaStats:
        key = (info.deployment, info.replica.name)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ReplicaStats()
        return stats

    def started(self, info: AttemptInfo) -> None:
        self._of(info).attempts += 1

    def failed(self, info: AttemptInfo) -> None:
        self._of(info).failures += 1

    def first_item(self, info: AttemptInfo, seconds: float) -> None:
        self._of(info).first_items.append((time.monotonic(), seconds))
        self._ttft.labels(info.deployment, info.replica.name).observe(seconds)

    def snapshot(self, deployment: str, replicas: list[str]) -> tuple[int, int]:
        """(attempts, failures) of these replicas so far."""
        found = [self._stats.get((deployment, r)) for r in replicas]
        return (
            sum(s.attempts for s in found if s is not None),
            sum(s.failures for s in found if s is not None),
        )

    def since(
        self, deployment: str, replicas: list[str], start: tuple[int, int], at: float
    ) -> Window:
        """What `replicas` did since `at` (time.monotonic), given their snapshot then."""
        attempts, failures = self.snapshot(deployment, replicas)
        times = sorted(
            seconds
            for r in replicas
            if (s := self._stats.get((deployment, r))) is not None
            for when, seconds in s.first_items
            if when >= at
        )
        p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)] if times else 0.0
        return Window(attempts - start[0], failures - start[1], p95)

    def forget(self, deployment: str, replica: str) -> None:
        self._stats.pop((deployment, replica), None)

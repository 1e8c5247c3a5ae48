"""Which replica takes a call: pure choices over a deployment's replicas, and the weighted split of
an alias across deployments.

Every balancer skips replicas whose breaker does not allow a call and those in `exclude` (already
tried by this call), and returns None when no replica is left: the caller fails fast rather than
queueing. Randomness comes from an injected `random.Random`, so a seeded one makes every choice
reproducible. Replica weights are honoured by all three balancers.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.routing.breaker import CircuitBreaker
from router.routing.config import BALANCER_KINDS, ReplicaConfig

VNODES = 160
"""Ring points per replica of average weight (Ketama's figure): spreads a removed replica's keys
over the others to within about ±10%."""


@dataclass(eq=False, slots=True)
class Replica:
    """A replica at run time: its config, its breaker and the calls it has in flight."""

    config: ReplicaConfig
    deployment: str
    breaker: CircuitBreaker
    outstanding: int = 0
    healthy: bool = True
    """Set by active health checks (and False while a replica is not loaded); an unhealthy
    replica takes no calls, whatever its breaker says."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def weight(self) -> float:
        return self.config.weight

    def __repr__(self) -> str:
        return f"Replica({self.deployment}/{self.name}, outstanding={self.outstanding})"


class Balancer(Protocol):
    def pick(self, key: str | None = None, exclude: Collection[Replica] = ()) -> Replica | None:
        """A replica for one call (`key`: affinity key, ignored by balancers without affinity)."""
        ...


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process (unlike hash(), salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _eligible(replica: Replica, exclude: Collection[Replica]) -> bool:
    return replica.healthy and replica.breaker.allow() and not (exclude and replica in exclude)


def _cumulative(weights: Sequence[float]) -> list[float]:
    total, cum = 0.0, []
    for w in weights:
        total += w
        cum.append(total)
    return cum


class PowerOfTwo:
    """Least outstanding calls between two replicas drawn at random (by weight): nearly as good as
    scanning every replica for the least loaded, at O(1) cost and without every router replica
    herding onto the same idle one (Mitzenmacher, "The Power of Two Choices")."""

    __slots__ = ("_cum", "_random", "_replicas", "_uniform")

    TRIES = 4
    """Draws per candidate before falling back to a scan: with a quarter of the replicas down,
    a candidate is still found by drawing 99.6% of the time."""

    def __init__(self, replicas: Sequence[Replica], rng: random.Random) -> None:
        self._replicas = tuple(replicas)
        self._random = rng.random
        self._uniform = len({r.weight for r in self._replicas}) <= 1
        self._cum = _cumulative([r.weight for r in self._replicas])

    def pick(self, key: str | None = None, exclude: Collection[Replica] = ()) -> Replica | None:
        if len(self._replicas) > 2:
            a = self._candidate(exclude, None)
            if a is not None:
                b = self._candidate(exclude, a)
                if b is not None:
                    return a if a.outstanding / a.weight <= b.outstanding / b.weight else b
        # Few replicas, or most of them unavailable: choose among those that are.
        ok = [r for r in self._replicas if _eligible(r, exclude)]
        if len(ok) < 2:
            return ok[0] if ok else None
        if len(ok) == 2:
            a, b = ok
            load_a, load_b = a.outstanding / a.weight, b.outstanding / b.weight
            if load_a == load_b:  # a tie is split by weight, as a draw would
                return a if self._random() * (a.weight + b.weight) < a.weight else b
            return a if load_a < load_b else b
        i, j = _two(_cumulative([r.weight for r in ok]), self._random)
        a, b = ok[i], ok[j]
        return a if a.outstanding / a.weight <= b.outstanding / b.weight else b

    def _candidate(self, exclude: Collection[Replica], other: Replica | None) -> Replica | None:
        """A replica drawn by weight among the available ones other than `other` (rejection
        sampling: redraw when the draw is unavailable), or None after TRIES draws."""
        replicas, rnd = self._replicas, self._random
        n, cum = len(replicas), self._cum
        for _ in range(self.TRIES):
            if self._uniform:
                replica = replicas[int(rnd() * n)]
            else:
                replica = replicas[min(bisect.bisect_right(cum, rnd() * cum[-1]), n - 1)]
            if replica is not other and _eligible(replica, exclude):
                return replica
        return None


def _two(cum: list[float], rnd: Callable[[], float]) -> tuple[int, int]:
    """Two distinct indexes drawn by weight without replacement (cum: cumulative weights)."""
    n = len(cum)
    i = min(bisect.bisect_right(cum, rnd() * cum[-1]), n - 1)
    low = cum[i - 1] if i else 0.0
    # Draw over the other weights: map the point past the slice [low, cum[i]) that i owns.
    x = rnd() * (cum[-1] - (cum[i] - low))
    if x >= low:
        x += cum[i] - low
    j = min(bisect.bisect_right(cum, x), n - 1)
    return i, j if j != i else (i + 1) % n  # j == i only through float rounding


class RoundRobin:
    """Each replica in turn, by weight, in the order of nginx's smooth weighted round robin: a
    replica of weight 3 next to one of weight 1 gets 3 of every 4 calls, interleaved rather than
    in a burst. With whole-number weights the order repeats every sum(weights) / gcd calls, so it
    is computed once and a pick walks it, skipping unavailable replicas; fractional weights (or a
    period over MAX_PERIOD) run the smooth algorithm on every pick, O(n)."""

    MAX_PERIOD = 1 << 16

    __slots__ = ("_current", "_next", "_replicas", "_schedule")

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self._replicas = tuple(replicas)
        self._next = 0
        self._current = [0.0] * len(self._replicas)
        self._schedule: tuple[Replica, ...] = ()
        weights = [r.weight for r in self._replicas]
        if weights and all(w.is_integer() for w in weights):
            period = int(sum(weights)) // math.gcd(*(int(w) for w in weights))
            if period <= self.MAX_PERIOD:
                order = [self._smooth(()) for _ in range(period)]
                self._schedule = tuple(r for r in order if r is not None)

    def pick(self, key: str | None = None, exclude: Collection[Replica] = ()) -> Replica | None:
        schedule = self._schedule
        if not schedule:
            return self._smooth(exclude)
        period = len(schedule)
        index = self._next
        refused: set[Replica] = set()
        for _ in range(period):
            replica = schedule[index]
            index = index + 1 if index + 1 < period else 0
            if _eligible(replica, exclude):
                self._next = index
                return replica
            refused.add(replica)
            if len(refused) == len(self._replicas):
                break
        return None

    def _smooth(self, exclude: Collection[Replica]) -> Replica | None:
        """nginx: every available replica gains its weight, the richest is chosen and pays the
        total."""
        best, total = -1, 0.0
        current = self._current
        for index, replica in enumerate(self._replicas):
            if _eligible(replica, exclude):
                current[index] += replica.weight
                total += replica.weight
                if best < 0 or current[index] > current[best]:
                    best = index
        if best < 0:
            return None
        current[best] -= total
        return self._replicas[best]


class Affinity:
    """Calls with the same key (a conversation id, a prompt prefix) go to the same replica while
    it is healthy, so its KV/prefix cache is reused; calls without a key use PowerOfTwo.

    Consistent hashing: each replica owns VNODES·weight points on a 64-bit ring, and a key goes to
    the owner of the first point at or after its hash. Removing a replica (or its breaker
    opening) moves only the keys it owned, spread over the others; they come back when it does.
    A lookup is a bisect, O(log n), not a hash per replica as rendezvous hashing would need.
    """

    __slots__ = ("_fallback", "_owners", "_points", "_replicas")

    def __init__(self, replicas: Sequence[Replica], rng: random.Random) -> None:
        self._replicas = tuple(replicas)
        self._fallback = PowerOfTwo(replicas, rng)
        mean = sum(r.weight for r in self._replicas) / max(len(self._replicas), 1)
        ring: list[tuple[int, int]] = []
        for index, replica in enumerate(self._replicas):
            vnodes = max(1, round(VNODES * replica.weight / mean))
            ring.extend((stable_hash(f"{replica.name}#{v}"), index) for v in range(vnodes))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [self._replicas[index] for _, index in ring]

    def pick(self, key: str | None = None, exclude: Collection[Replica] = ()) -> Replica | None:
        if key is None:
            return self._fallback.pick(None, exclude)
        points, owners = self._points, self._owners
        n = len(points)
        start = bisect.bisect_left(points, stable_hash(key))
        refused: set[Replica] = set()
        for step in range(n):
            owner = owners[(start + step) % n]
            if owner in refused:
                continue
            if _eligible(owner, exclude):
                return owner
            refused.add(owner)
            if len(refused) == len(self._replicas):
                break
        return None


def make_balancer(kind: str, replicas: Sequence[Replica], rng: random.Random) -> Balancer:
    """The balancer named by a deployment's `balancer` setting."""
    if kind == "p2c":
        return PowerOfTwo(replicas, rng)
    if kind == "round_robin":
        return RoundRobin(replicas)
    if kind == "affinity":
        return Affinity(replicas, rng)
    raise ValueError(f"balancer {kind!r} is unknown; use one of {BALANCER_KINDS}")


class WeightedSplit:
    """An alias's split across deployments: each call picks one with probability weight / sum."""

    __slots__ = ("_cum", "_names")

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            raise ValueError("a weighted split needs at least one target")
        self._names = tuple(weights)
        self._cum = _cumulative(list(weights.values()))

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def pick(self, rng: random.Random) -> str:
        """A target drawn at random: the proportions hold over many calls."""
        return self._at(rng.random())

    def pick_for_key(self, key: str) -> str:
        """A target fixed by the key (a user or session id): the same caller stays on the same
        side of an A/B test, and the proportions hold over many callers."""
        return self._at(stable_hash(key) / 2.0**64)

    def _at(self, unit: float) -> str:
        cum = self._cum
        return self._names[min(bisect.bisect_right(cum, unit * cum[-1]), len(cum) - 1)]

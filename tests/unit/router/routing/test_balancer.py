"""Replica choice and the weighted split, with seeded random sources."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from router.routing.balancer import (
    Affinity,
    PowerOfTwo,
    Replica,
    RoundRobin,
    WeightedSplit,
    make_balancer,
    stable_hash,
)
from router.routing.breaker import CircuitBreaker
from router.routing.config import BreakerConfig, ReplicaConfig


def make_replicas(n: int, weights: list[float] | None = None) -> list[Replica]:
    weights = weights or [1.0] * n
    config = BreakerConfig(consecutive_failures=1, cooldown_s=60.0)
    return [
        Replica(ReplicaConfig(f"r{i}", weight=weights[i]), "dep", CircuitBreaker(config))
        for i in range(n)
    ]


def trip(replica: Replica) -> None:
    replica.breaker.on_failure(replica.breaker.on_start())
    assert not replica.breaker.allow()


def names(picks: list[Replica | None]) -> list[str]:
    return [p.name if p is not None else "-" for p in picks]


# ---- power of two choices --------------------------------------------------------------------


def test_p2c_prefers_the_less_loaded_and_never_the_most_loaded() -> None:
    replicas = make_replicas(64)
    for i, replica in enumerate(replicas):
        replica.outstanding = i
    balancer = PowerOfTwo(replicas, random.Random(1))
    picks = [balancer.pick() for _ in range(4000)]
    loads = [p.outstanding for p in picks if p is not None]
    assert len(loads) == 4000
    assert 63 not in loads
    # The lesser of two uniform draws from 0..63 averages about 21; a single draw 31.5.
    assert 18 < statistics.mean(loads) < 24


def test_p2c_with_two_replicas_always_takes_the_idle_one() -> None:
    replicas = make_replicas(2)
    replicas[0].outstanding = 3
    balancer = PowerOfTwo(replicas, random.Random(2))
    assert {balancer.pick() for _ in range(100)} == {replicas[1]}


def test_p2c_skips_open_breakers_and_excluded_replicas() -> None:
    replicas = make_replicas(16)
    for replica in replicas[3:]:
        trip(replica)
    balancer = PowerOfTwo(replicas, random.Random(3))
    assert set(names([balancer.pick() for _ in range(500)])) == {"r0", "r1", "r2"}
    assert set(names([balancer.pick(exclude={replicas[0]}) for _ in range(200)])) == {"r1", "r2"}
    assert balancer.pick(exclude=set(replicas[:3])) is None
    for replica in replicas[:3]:
        trip(replica)
    assert balancer.pick() is None


def test_p2c_splits_idle_replicas_by_weight() -> None:
    replicas = make_replicas(2, [1.0, 3.0])
    balancer = PowerOfTwo(replicas, random.Random(4))
    n = 8000
    heavy = sum(balancer.pick() is replicas[1] for _ in range(n)) / n
    # Expected 0.75; the standard deviation of the share is about 0.005.
    assert abs(heavy - 0.75) < 0.025


# ---- round robin -----------------------------------------------------------------------------


def test_round_robin_cycles_and_skips_open_breakers() -> None:
    replicas = make_replicas(4)
    balancer = RoundRobin(replicas)
    assert names([balancer.pick() for _ in range(6)]) == ["r0", "r1", "r2", "r3", "r0", "r1"]
    trip(replicas[3])
    assert names([balancer.pick() for _ in range(4)]) == ["r2", "r0", "r1", "r2"]
    assert names([balancer.pick(exclude={replicas[0]}) for _ in range(2)]) == ["r1", "r2"]
    for replica in replicas:
        if replica.breaker.allow():
            trip(replica)
    assert balancer.pick() is None


def test_weighted_round_robin_is_smooth_and_exact() -> None:
    replicas = make_replicas(3, [5.0, 1.0, 1.0])
    balancer = RoundRobin(replicas)
    sequence = names([balancer.pick() for _ in range(7)])
    # nginx's smooth weighted round robin: the heavy replica is interleaved, not sent 5 in a row.
    assert sequence == ["r0", "r0", "r1", "r0", "r2", "r0", "r0"]
    counts = Counter(names([balancer.pick() for _ in range(700)]))
    assert counts == {"r0": 500, "r1": 100, "r2": 100}


def test_fractional_weights_round_robin_in_proportion() -> None:
    replicas = make_replicas(2, [1.5, 0.5])
    balancer = RoundRobin(replicas)
    counts = Counter(names([balancer.pick() for _ in range(400)]))
    assert counts == {"r0": 300, "r1": 100}
    trip(replicas[0])
    assert set(names([balancer.pick() for _ in range(10)])) == {"r1"}


def test_p2c_draws_around_a_quarter_of_open_breakers() -> None:
    replicas = make_replicas(64)
    for i, replica in enumerate(replicas):
        replica.outstanding = i
        if i % 4 == 0:
            trip(replica)
    balancer = PowerOfTwo(replicas, random.Random(15))
    picks = [balancer.pick() for _ in range(2000)]
    assert all(p is not None and p.breaker.allow() for p in picks)
    assert statistics.mean(p.outstanding for p in picks if p is not None) < 26


# ---- affinity --------------------------------------------------------------------------------


def keys(n: int) -> list[str]:
    return [f"conversation-{i}" for i in range(n)]


def owners(balancer: Affinity, ks: list[str]) -> dict[str, str]:
    out = {}
    for k in ks:
        picked = balancer.pick(k)
        assert picked is not None
        out[k] = picked.name
    return out


def test_affinity_sends_a_key_to_the_same_replica_and_spreads_keys() -> None:
    replicas = make_replicas(8)
    balancer = Affinity(replicas, random.Random(5))
    first = owners(balancer, keys(4000))
    for replica in replicas:  # load does not move a key
        replica.outstanding = 100
    assert owners(balancer, keys(4000)) == first
    counts = Counter(first.values())
    assert len(counts) == 8
    assert max(counts.values()) < 1.5 * 4000 / 8
    assert min(counts.values()) > 0.5 * 4000 / 8


def test_affinity_is_the_same_in_every_router_process() -> None:
    # Python's hash() is salted per process; replicas of the router must agree on the owner.
    assert stable_hash("conversation-1") == 0xA4D8443E71E35A65  # blake2b-64, little-endian
    balancer = Affinity(make_replicas(8), random.Random(6))
    again = Affinity(make_replicas(8), random.Random(7))
    assert owners(balancer, keys(500)) == owners(again, keys(500))


def test_removing_a_replica_moves_only_its_keys() -> None:
    n = 10
    replicas = make_replicas(n)
    ks = keys(5000)
    before = owners(Affinity(replicas, random.Random(8)), ks)
    removed = replicas[3]
    after = owners(Affinity([r for r in replicas if r is not removed], random.Random(8)), ks)
    moved = [k for k in ks if before[k] != after[k]]
    assert all(before[k] == removed.name for k in moved)
    assert set(moved) == {k for k in ks if before[k] == removed.name}
    assert 0.5 / n < len(moved) / len(ks) < 1.5 / n
    # The moved keys are spread over the others, not dumped on one neighbour.
    assert len(Counter(after[k] for k in moved)) >= n // 2


def test_an_open_breaker_moves_its_keys_until_it_closes() -> None:
    clock = [0.0]
    config = BreakerConfig(consecutive_failures=1, cooldown_s=5.0)
    replicas = [
        Replica(ReplicaConfig(f"r{i}"), "dep", CircuitBreaker(config, clock=lambda: clock[0]))
        for i in range(6)
    ]
    balancer = Affinity(replicas, random.Random(9))
    ks = keys(2000)
    before = owners(balancer, ks)
    trip(replicas[2])
    during = owners(balancer, ks)
    assert {k for k in ks if before[k] != during[k]} == {k for k in ks if before[k] == "r2"}
    assert "r2" not in during.values()
    clock[0] = 5.0  # half-open: its keys come back (one probe at a time)
    replicas[2].breaker.on_success(replicas[2].breaker.on_start())
    assert owners(balancer, ks) == before


def test_affinity_without_a_key_balances_by_load() -> None:
    replicas = make_replicas(2)
    replicas[1].outstanding = 5
    balancer = Affinity(replicas, random.Random(10))
    assert {balancer.pick(None) for _ in range(50)} == {replicas[0]}


def test_affinity_honours_weights() -> None:
    replicas = make_replicas(2, [1.0, 3.0])
    counts = Counter(owners(Affinity(replicas, random.Random(11)), keys(8000)).values())
    assert 0.68 < counts["r1"] / 8000 < 0.82


def test_affinity_returns_none_when_every_replica_is_down() -> None:
    replicas = make_replicas(3)
    for replica in replicas:
        trip(replica)
    assert Affinity(replicas, random.Random(12)).pick("k") is None


# ---- factory and weighted split --------------------------------------------------------------


def test_make_balancer_names_the_accepted_kinds() -> None:
    replicas = make_replicas(2)
    assert isinstance(make_balancer("round_robin", replicas, random.Random()), RoundRobin)
    with pytest.raises(ValueError, match=r"'random' is unknown; use one of \('p2c',"):
        make_balancer("random", replicas, random.Random())


def test_weighted_split_proportions_with_a_seeded_rng() -> None:
    split = WeightedSplit({"stable": 90.0, "canary": 10.0})
    rng = random.Random(13)
    n = 20_000
    canary = sum(split.pick(rng) == "canary" for _ in range(n)) / n
    # Standard deviation of the share: sqrt(0.1 * 0.9 / n) = 0.0021; allow 5 of them.
    assert abs(canary - 0.10) < 0.0106
    # The same seed gives the same sequence: a rollout can be replayed.
    one, two = random.Random(14), random.Random(14)
    assert [split.pick(one) for _ in range(50)] == [split.pick(two) for _ in range(50)]


def test_weighted_split_by_key_is_sticky_and_proportional() -> None:
    split = WeightedSplit({"a": 1.0, "b": 1.0, "c": 2.0})
    users = [f"user-{i}" for i in range(20_000)]
    first = [split.pick_for_key(u) for u in users]
    assert first == [split.pick_for_key(u) for u in users]
    counts = Counter(first)
    assert abs(counts["c"] / len(users) - 0.5) < 0.02
    assert abs(counts["a"] / len(users) - 0.25) < 0.02

"""Admission by expected wait, driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from router.errors import ResourceExhausted
from router.scheduler.admission import MIN_DEPARTURES, MIN_FIRST_TOKENS, Admission
from router.scheduler.generation import EngineLimits
from router.scheduler.request import Priority

N = Priority.NORMAL


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, *, slots: int = 2, waiting: int = 100, bound: float = 10.0) -> Admission:
    return Admission("m", EngineLimits(slots, 512, waiting, 2048, bound), clock=clock)


def instant_first_tokens(admission: Admission) -> Admission:
    """First tokens measured as instant: a call may wait the whole bound for a slot."""
    for _ in range(MIN_FIRST_TOKENS):
        admission.first_token(0.0)
    return admission


def saturate_with_rate(admission: Admission, clock: Clock, per_s: float, slots: int = 2) -> None:
    """Keep every slot full while MIN_DEPARTURES calls leave at `per_s`."""
    for _ in range(slots):
        admission.admit(N)
    for _ in range(MIN_DEPARTURES):
        admission.admit(N)  # the queue never drains: each departure is under full load
        clock.now += 1 / per_s
        admission.depart(N)


def admit_until_shed(admission: Admission) -> tuple[int, ResourceExhausted]:
    """Admit calls until one is shed: how many were admitted, and the shed call's error."""
    admitted = 0
    while True:
        try:
            admission.admit(N)
        except ResourceExhausted as error:
            return admitted, error
        admitted += 1


def test_a_free_slot_means_no_wait_and_no_rate_means_only_the_length_limit() -> None:
    clock = Clock()
    admission = make(clock, waiting=3)
    assert admission.expected_wait_s(N) == 0.0
    for _ in range(5):  # 2 slots + 3 waiting, no rate known yet: all admitted
        admission.admit(N)
    assert admission.expected_wait_s(N) is None
    with pytest.raises(ResourceExhausted, match="5 requests in flight") as refused:
        admission.admit(N)
    assert refused.value.retry_after_s == 1.0


def test_a_call_that_would_wait_past_the_bound_is_shed_with_the_drain_time() -> None:
    clock = Clock()
    admission = instant_first_tokens(make(clock, bound=10.0))
    saturate_with_rate(admission, clock, per_s=2.0)  # 2 slots busy, 0 waiting, 2 leave per s
    assert admission.departures_per_s() == pytest.approx(2.0)
    assert admission.expected_wait_s(N) == pytest.approx(0.5)  # the next departure
    admitted, shed = admit_until_shed(admission)
    # Waits 0.5, 1.0, ..., 5.0 s are within half the bound: 10 calls queue, the 11th is shed
    # and told to come back when the queue ahead of it has drained.
    assert admitted == 10
    assert "would wait about 5.5 s" in str(shed) and "max_queue_wait_s" in str(shed)
    assert shed.retry_after_s == pytest.approx(5.5)
    clock.now += 0.5
    admission.depart(N)  # one more left: the next call fits again
    admission.admit(N)


def test_high_priority_calls_only_wait_behind_their_own_kind() -> None:
    clock = Clock()
    admission = instant_first_tokens(make(clock, bound=3.0))
    saturate_with_rate(admission, clock, per_s=1.0)
    admission.admit(N)  # waits 1 s, within half the bound; now one NORMAL call is waiting
    with pytest.raises(ResourceExhausted, match=r"a LOW call would wait about 2\.0 s"):
        admission.admit(Priority.LOW)  # behind it: (1 + 1) / 1 s
    assert admission.expected_wait_s(Priority.HIGH) == pytest.approx(1.0)
    admission.admit(Priority.HIGH)  # ahead of it


def test_idle_time_between_bursts_does_not_dilute_the_rate() -> None:
    clock = Clock()
    admission = make(clock)
    saturate_with_rate(admission, clock, per_s=4.0)
    for _ in range(2):
        clock.now += 0.25
        admission.depart(N)
    assert admission.in_flight == 0
    clock.now += 600  # ten idle minutes
    for _ in range(2):
        admission.admit(N)
    assert admission.departures_per_s() == pytest.approx(4.0, rel=0.05)


def test_a_stalled_engine_loses_its_rate() -> None:
    clock = Clock()
    admission = make(clock)
    saturate_with_rate(admission, clock, per_s=4.0)
    before = admission.departures_per_s()
    assert before is not None
    clock.now += 120  # full, and nothing leaves
    after = admission.departures_per_s()
    assert after is not None and after < before / 10
    with pytest.raises(ResourceExhausted, match="would wait"):
        admission.admit(N)


def test_calls_that_never_held_a_slot_are_not_departures() -> None:
    clock = Clock()
    admission = make(clock, bound=0.0)  # bound off: only the length limit
    for _ in range(MIN_DEPARTURES + 2):
        admission.admit(N)
    for _ in range(MIN_DEPARTURES):
        clock.now += 1
        admission.depart(N, held_slot=False)
    assert admission.departures_per_s() is None


def test_check_says_what_admit_would_and_counts_nothing() -> None:
    clock = Clock()
    admission = make(clock, waiting=1)
    admission.check(N)
    assert admission.in_flight == 0
    for _ in range(3):
        admission.admit(N)
    with pytest.raises(ResourceExhausted, match="3 requests in flight"):
        admission.check(N)
    assert admission.in_flight == 3


def test_the_bound_is_for_the_first_token_so_slow_first_tokens_shorten_the_slot_wait() -> None:
    clock = Clock()
    admission = make(clock, bound=10.0)
    # Nothing measured yet, and then too little: half the bound (a cold burst's first samples
    # are its fastest prefills).
    assert admission.slot_wait_s == 5.0
    for _ in range(MIN_FIRST_TOKENS - 2):
        admission.first_token(0.5)
    assert admission.slot_wait_s == 5.0
    admission.first_token(0.5)
    admission.first_token(3.0)  # one slow prefill in 16: the 90th percentile stays 0.5 s
    assert admission.slot_wait_s == pytest.approx(9.5)
    for _ in range(20):
        admission.first_token(3.0)
    assert admission.slot_wait_s == pytest.approx(7.0)
    saturate_with_rate(admission, clock, per_s=2.0)
    admitted, shed = admit_until_shed(admission)
    # Waits of 0.5 s steps within half of the 7 s left for a slot: 7 queue, the 8th is shed.
    assert admitted == 7
    assert "would wait about 4.0 s" in str(shed) and "first token" in str(shed)
    for _ in range(64):
        admission.first_token(60.0)  # however slow: at least half the bound for a slot
    assert admission.slot_wait_s == 5.0
    assert make(clock, bound=0.0).slot_wait_s == 0.0

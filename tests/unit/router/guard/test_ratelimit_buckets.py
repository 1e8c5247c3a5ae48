"""The GCRA bucket math and the in-process store, with a hand-driven clock (no sleeps)."""

from __future__ import annotations

import pytest

from router.guard.limits.buckets import WINDOW_S, Bucket, StreamSlot, gcra_charge, gcra_refund
from router.guard.limits.memory_store import MemoryStore


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def burst(limit: int, *, amount: int = 1, now: float = 0.0) -> tuple[int, float | None, float]:
    """Charge `amount` units until the bucket rejects: (admitted, tat, wait of the rejection)."""
    interval = WINDOW_S / limit
    tat: float | None = None
    for admitted in range(10 * limit):
        new_tat, wait = gcra_charge(tat, now, interval, amount)
        if wait > 0:
            return admitted, tat, wait
        tat = new_tat
    raise AssertionError("never rejected")


@pytest.mark.parametrize("limit", [1, 7, 100, 1000, 60_000, 1_000_000])
def test_full_bucket_admits_exactly_its_limit_then_waits_one_interval(limit: int) -> None:
    admitted, _, wait = burst(limit, now=12345.678)
    assert admitted == limit
    # Summed float intervals drift by far less than a unit even over a million charges.
    assert wait == pytest.approx(WINDOW_S / limit, rel=1e-2)


def test_bucket_refills_continuously() -> None:
    interval = 0.6  # 100 per minute
    _, tat, _ = burst(100)
    # 0.59 s later less than one unit has come back; 0.6 s later exactly one has.
    assert gcra_charge(tat, 0.59, interval, 1)[1] == pytest.approx(0.01)
    tat, wait = gcra_charge(tat, 0.6, interval, 1)
    assert wait == 0.0
    assert gcra_charge(tat, 0.6, interval, 1)[1] == pytest.approx(0.6)
    # A minute later the bucket is full again: another whole burst fits.
    assert burst(100, now=tat + 60.0)[0] == 100


def test_token_charge_waits_until_enough_tokens_refilled() -> None:
    interval = WINDOW_S / 1000  # 1000 tokens per minute
    tat, wait = gcra_charge(None, 0.0, interval, 900)
    assert wait == 0.0
    # 100 tokens left; 400 more need 300 tokens of refill = 18 s.
    assert gcra_charge(tat, 0.0, interval, 400)[1] == pytest.approx(18.0)


def test_refund_returns_tokens_but_never_beyond_full() -> None:
    interval = WINDOW_S / 1000
    drained, _ = gcra_charge(None, 0.0, interval, 1000)
    assert gcra_charge(drained, 0.0, interval, 1)[1] > 0
    tat = gcra_refund(drained, 0.0, interval, 600)
    assert tat is not None
    assert burst_from(tat, interval, 1) == 600
    # A refund larger than what was taken leaves a full bucket (None), not a bigger one.
    assert gcra_refund(tat, 0.0, interval, 10_000) is None
    assert gcra_refund(None, 0.0, interval, 10) is None


def test_negative_refund_charges_the_overrun() -> None:
    interval = WINDOW_S / 1000
    tat = gcra_refund(None, 0.0, interval, -250)
    assert tat == pytest.approx(15.0)
    assert burst_from(tat, interval, 1) == 750


def burst_from(tat: float | None, interval: float, amount: int, now: float = 0.0) -> int:
    admitted = 0
    while True:
        new_tat, wait = gcra_charge(tat, now, interval, amount)
        if wait > 0:
            return admitted
        tat, admitted = new_tat, admitted + 1


async def test_memory_store_charges_all_buckets_or_none() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    requests = Bucket("req", WINDOW_S / 10)
    assert await store.charge([requests, Bucket("tok", WINDOW_S / 100)], [1, 80], None) is None
    # The token bucket lacks room: the request bucket must not be charged either.
    rejection = await store.charge([requests, Bucket("tok", WINDOW_S / 100)], [1, 30], None)
    assert rejection is not None
    assert rejection.waits[0] == 0.0
    assert rejection.waits[1] == pytest.approx(6.0)  # 10 tokens short at 100/min
    admitted = 0
    while await store.charge([requests], [1], None) is None:
        admitted += 1
    assert admitted == 9  # 10 per minute, one taken by the first call only


async def test_memory_store_stream_slots() -> None:
    store = MemoryStore(FakeClock())
    slot = StreamSlot("streams", 2, "m")
    assert await store.charge([], [], slot) is None
    assert await store.charge([], [], slot) is None
    rejection = await store.charge([], [], slot)
    assert rejection is not None and rejection.streams_full
    await store.refund([], [], slot)
    assert store.open_streams("streams") == 1
    assert await store.charge([], [], slot) is None


async def test_memory_store_forgets_full_buckets() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    for key in range(50):
        await store.charge([Bucket(f"key{key}", 0.6)], [1], None)
    assert len(store) == 50
    clock.advance(120.0)  # all full again, and past the sweep interval
    await store.charge([Bucket("other", 0.6)], [1], None)
    assert len(store) == 1

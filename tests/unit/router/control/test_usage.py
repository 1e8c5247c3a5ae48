"""Usage metering on a real SQLite registry: calls bucketed in memory, written in batches that
add to what another router wrote, kept while the database refuses them, summed by group."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from router.control import usage
from router.control.usage import Pricing, UsageRecorder
from router.errors import InvalidArgument, Unavailable
from router.guard.chain import CallScope
from router.guard.identity import Identity
from router.registry.database import open_database
from router.telemetry import Metrics

DAY = 86_400
T0 = 20_000 * DAY + 3_600  # 4 Oct 2024, 01:00 UTC


def scope(model: str, prompt: int, completion: int, tenant: str = "") -> CallScope:
    s = CallScope(method="/irouter.v1.InferenceService/Generate", request_id="", metadata={})
    if tenant:
        s.identity = Identity(f"key-{tenant}", tenant, frozenset(), "api_key", key_id=f"k-{tenant}")
    s.model, s.prompt_tokens, s.completion_tokens = model, prompt, completion
    return s


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    return open_database(f"sqlite:///{tmp_path / 'r.db'}")


async def test_calls_are_priced_bucketed_and_summed(engine) -> None:  # type: ignore[no-untyped-def]
    now = [float(T0)]
    metrics = Metrics()
    recorder = UsageRecorder(engine, metrics, clock=lambda: now[0])
    recorder.set_pricing("chat", Pricing("smol", "2", Decimal("0.5"), Decimal("1.5")))
    recorder.record(scope("chat", 100, 10, tenant="acme"))
    recorder.record(scope("chat", 300, 30, tenant="acme"))
    recorder.record(scope("embedder", 7, 0))  # a config-file model: no version, free
    recorder.record(scope("chat", 0, 0, tenant="acme"))  # refused before any token: not billed
    now[0] += DAY  # the next day
    recorder.record(scope("chat", 1000, 0, tenant="globex"))
    await recorder.flush()
    # A second router adds to the same minute's row instead of replacing it.
    other = UsageRecorder(engine, Metrics(), clock=lambda: float(T0))
    other.set_pricing("chat", Pricing("smol", "2", Decimal("0.5"), Decimal("1.5")))
    other.record(scope("chat", 100, 10, tenant="acme"))
    await other.flush()

    rows = usage.query(engine, T0 - DAY, T0 + 2 * DAY, ["tenant", "version", "day"])
    got = {
        (r.tenant, r.version, r.day): (r.calls, r.input_tokens, r.output_tokens, r.cost)
        for r in rows
    }
    assert got == {
        ("acme", "2", "2024-10-04"): (3, 500, 50, Decimal("0.325")),
        ("anonymous", "", "2024-10-04"): (1, 7, 0, Decimal(0)),
        ("globex", "2", "2024-10-05"): (1, 1000, 0, Decimal("0.5")),
    }
    (total,) = usage.query(engine, T0 - DAY, T0 + 2 * DAY, [])
    assert (total.calls, total.cost, total.currency) == (5, Decimal("0.825"), "USD")
    value = metrics.registry.get_sample_value(
        "irouter_usage_tokens_total",
        {"tenant": "acme", "model": "chat", "version": "2", "kind": "output"},
    )
    assert value == 40
    with pytest.raises(InvalidArgument, match="group_by"):
        usage.query(engine, T0, T0 + 1, ["colour"])


async def test_buckets_wait_while_the_database_refuses_them(engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    recorder = UsageRecorder(engine, Metrics(), clock=lambda: float(T0))
    write = recorder._write

    def down(batch: object) -> None:
        raise Unavailable("the registry database cannot be reached")

    monkeypatch.setattr(recorder, "_write", down)
    recorder.record(scope("chat", 10, 1))
    await recorder.flush()
    recorder.record(scope("chat", 10, 1))
    await recorder.flush()
    assert usage.query(engine, T0 - 60, T0 + 60, []) == []
    monkeypatch.setattr(recorder, "_write", write)
    await recorder.flush()
    (row,) = usage.query(engine, T0 - 60, T0 + 60, [])
    assert (row.calls, row.input_tokens, row.output_tokens) == (2, 20, 2)


async def test_during_a_rollout_each_replica_bills_at_its_versions_prices(engine) -> None:  # type: ignore[no-untyped-def]
    recorder = UsageRecorder(engine, Metrics(), clock=lambda: float(T0))
    recorder.set_pricing("chat", Pricing("smol", "1", Decimal("1"), Decimal("0")))
    recorder.add_pricing("chat", Pricing("smol", "2", Decimal("10"), Decimal("0")))
    recorder.set_replica_versions("chat", {"r0": "1", "r1": "2"})

    def call(replica: str) -> CallScope:
        s = scope("chat", 1000, 0, tenant="acme")
        s.served_replica = replica
        return s

    recorder.record(call("r0"))  # the old version's replica: its prices
    recorder.record(call("r1"))  # the rollout's target: the target's prices, not the old ones
    recorder.record(call(""))  # not routed (unknown replica): the deployment's own version
    await recorder.flush()
    rows = usage.query(engine, T0 - DAY, T0 + DAY, ["version"])
    assert {r.version: (r.calls, r.cost) for r in rows} == {
        "1": (2, Decimal(2)),
        "2": (1, Decimal(10)),
    }
    # The rollout completes: the deployment bills at version 2 alone.
    recorder.set_pricing("chat", Pricing("smol", "2", Decimal("10"), Decimal("0")))
    recorder.set_replica_versions("chat", {"r1": "2"})
    recorder.record(call("r1"))
    await recorder.flush()
    rows = usage.query(engine, T0 - DAY, T0 + DAY, ["version"])
    assert {r.version: r.calls for r in rows} == {"1": 2, "2": 2}

"""The harness's metrics against numpy computed from the same hand-built records."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.harness.record import records_from_columns, records_to_columns
from loadtest.harness.stats import distribution, meets_slo, stage_duration, summarize, timeseries
from tests.unit.loadtest.factories import make_record, random_records


def _np_dist(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "min": float(ms.min()),
        "max": float(ms.max()),
    }


def test_distribution_matches_numpy_percentiles() -> None:
    values = list(np.random.default_rng(1).exponential(0.05, size=999))
    got = distribution(values)
    assert got is not None
    for key, expected in _np_dist(values).items():
        assert got[key] == pytest.approx(expected, rel=1e-12), key
    assert distribution([]) is None


def test_summary_matches_numpy_over_successful_requests() -> None:
    records = random_records(500, seed=3, error_every=7)
    duration = stage_duration(records)
    s = summarize(records, duration)
    ok = [r for r in records if r.status == "OK"]
    failed = len(records) - len(ok)
    assert failed > 0
    assert (s["requests"], s["completed"], s["failed"]) == (500, len(ok), failed)
    assert s["errors"] == {"grpc:UNAVAILABLE": failed}
    assert duration == max(r.end for r in records)
    assert s["request_throughput"] == pytest.approx(len(ok) / duration)
    assert s["output_token_throughput"] == pytest.approx(
        sum(r.output_tokens for r in ok) / duration
    )
    assert s["input_token_throughput"] == pytest.approx(sum(r.input_tokens for r in ok) / duration)
    expected = {
        "ttft_ms": _np_dist([r.ttft for r in ok if r.ttft is not None]),
        "e2e_ms": _np_dist([r.end - r.start for r in ok]),
        # ITL pools every gap of every stream; TPOT is one value per request with 2+ tokens.
        "itl_ms": _np_dist([g for r in ok for g in r.itl]),
        "tpot_ms": _np_dist(
            [(r.end - r.start - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]  # type: ignore[operator]
        ),
    }
    for name, dist in expected.items():
        for key, value in dist.items():
            assert s[name][key] == pytest.approx(value, rel=1e-9), (name, key)


def test_tpot_is_only_defined_for_streams() -> None:
    streamed = make_record("Generate", e2e=0.5, ttft=0.1, output_tokens=5)
    whole = make_record("Complete", e2e=0.5, ttft=0.5, output_tokens=5)
    assert streamed.tpot == pytest.approx(0.1)
    assert whole.tpot is None
    assert summarize([whole], 1.0)["tpot_ms"] is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    records = [
        make_record(ttft=0.05, e2e=0.5),  # good
        make_record(ttft=0.25, e2e=0.5),  # TTFT too slow
        make_record(ttft=0.05, e2e=2.5),  # E2E too slow
        make_record(ttft=0.05, e2e=0.5, status="http:503"),  # failed
        make_record(method="Complete", ttft=0.1, e2e=0.1),  # good (TTFT = e2e when unary)
    ]
    slo = (("ttft_ms", 200.0), ("e2e_ms", 2000.0))
    assert [meets_slo(r, slo) for r in records] == [True, False, False, False, True]
    s = summarize(records, 4.0, slo)
    assert s["goodput"] == pytest.approx(2 / 4.0)
    assert s["goodput_fraction"] == pytest.approx(2 / 5)
    assert s["errors"] == {"http:503": 1}
    assert not meets_slo(make_record(itl=[0.01, 0.3]), (("itl_ms", 100.0),))


def test_timeseries_windows_hold_every_answer() -> None:
    records = random_records(300, seed=5)
    ts = timeseries(records, windows=10)
    width = ts["t"][0]
    assert sum(rate * width for rate in ts["requests_per_s"]) == pytest.approx(300)
    assert all(
        a <= b <= c for a, b, c in zip(ts["e2e_p50"], ts["e2e_p90"], ts["e2e_p99"], strict=True)
    )
    assert timeseries([make_record(status="grpc:INTERNAL")]) == {"t": []}


def test_records_round_trip_through_columns() -> None:
    records = random_records(20, seed=9, error_every=4)
    records[0].error = "boom"
    records[1].process = 1
    back = records_from_columns(records_to_columns(records))
    assert [r.status for r in back] == [r.status for r in records]
    assert [r.process for r in back[:3]] == [0, 1, 0]
    assert back[0].error == "boom"
    for a, b in zip(back, records, strict=True):
        assert a.end == pytest.approx(b.end, abs=1e-6)
        assert a.itl == pytest.approx(b.itl, abs=1e-6)

"""Metrics of one stage, defined as vLLM's `bench serve` defines them:

- request throughput: successful requests / stage duration (first send to last answer);
- input / output token throughput: server-reported prompt / completion tokens of successful
  requests / duration;
- TTFT: send to first content chunk (a non-streamed answer's first token arrives with all others,
  so its TTFT is its end-to-end latency);
- ITL: every gap between consecutive content chunks of every stream, pooled;
- TPOT: per request, (e2e - TTFT) / (output tokens - 1), for requests with 2+ output tokens;
- e2e: send to last byte;
- goodput: successful requests meeting every SLO / duration (vLLM's --goodput; itl_ms bounds
  the request's worst gap).
Percentiles use numpy's default linear interpolation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from loadtest.harness.record import RequestRecord

PERCENTILES = (50, 90, 99)


def distribution(values_s: Iterable[float]) -> dict[str, float] | None:
    """mean, p50, p90, p99, min, max in milliseconds; None when there are no values."""
    arr = np.fromiter(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return None
    out = {"mean": float(arr.mean())}
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    out["min"] = float(arr.min())
    out["max"] = float(arr.max())
    return out


def meets_slo(r: RequestRecord, slo: Sequence[tuple[str, float]]) -> bool:
    if not r.ok:
        return False
    for key, limit_ms in slo:
        limit = limit_ms / 1000.0
        if key == "e2e_ms" and r.e2e > limit:
            return False
        if key == "ttft_ms" and (r.ttft if r.ttft is not None else r.e2e) > limit:
            return False
        if key == "tpot_ms" and (r.tpot or 0.0) > limit:
            return False
        if key == "itl_ms" and r.itl and max(r.itl) > limit:
            return False
    return True


def stage_duration(records: Sequence[RequestRecord]) -> float:
    """From the stage's start instant (0) to the last answer."""
    return max((r.end for r in records), default=0.0)


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: Sequence[tuple[str, float]] = (),
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    input_tokens = sum(r.input_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    errors = Counter(r.status for r in records if not r.ok)
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_throughput": input_tokens / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution(r.ttft for r in ok if r.ttft is not None),
        "tpot_ms": distribution(t for r in ok if (t := r.tpot) is not None),
        "itl_ms": distribution(gap for r in ok for gap in r.itl),
        "e2e_ms": distribution(r.e2e for r in ok),
        "send_lag_ms": distribution(r.lag for r in records),
    }
    if slo:
        good = sum(1 for r in ok if meets_slo(r, slo))
        summary["slo"] = dict(slo)
        summary["goodput"] = good / duration
        summary["goodput_fraction"] = good / len(records) if records else 0.0
    methods: dict[str, dict[str, Any]] = {}
    for method in sorted({r.method for r in records}):
        mine = [r for r in records if r.method == method]
        mine_ok = [r for r in mine if r.ok]
        methods[method] = {
            "requests": len(mine),
            "completed": len(mine_ok),
            "request_throughput": len(mine_ok) / duration,
            "e2e_ms": distribution(r.e2e for r in mine_ok),
            "ttft_ms": distribution(r.ttft for r in mine_ok if r.ttft is not None),
        }
    summary["methods"] = methods
    return summary


def timeseries(records: Sequence[RequestRecord], windows: int = 30) -> dict[str, list[float]]:
    """Per window of completion time: window end (s), completions/s, output tok/s and e2e/TTFT
    percentiles (ms; NaN-free: windows without answers are dropped)."""
    ok = [r for r in records if r.ok]
    if not ok:
        return {"t": []}
    span = max(r.end for r in ok)
    width = max(span / windows, 0.05)
    ends = np.array([r.end for r in ok])
    index = np.minimum((ends / width).astype(int), int(span / width))
    out: dict[str, list[float]] = {
        key: []
        for key in (
            "t",
            "requests_per_s",
            "output_tokens_per_s",
            "e2e_p50",
            "e2e_p90",
            "e2e_p99",
            "ttft_p50",
            "ttft_p99",
        )
    }
    for w in sorted(set(index.tolist())):
        rows = [ok[i] for i in np.flatnonzero(index == w)]
        e2e = np.array([r.e2e for r in rows]) * 1000
        ttft = np.array([r.ttft for r in rows if r.ttft is not None]) * 1000
        out["t"].append((w + 1) * width)
        out["requests_per_s"].append(len(rows) / width)
        out["output_tokens_per_s"].append(sum(r.output_tokens for r in rows) / width)
        for p in PERCENTILES:
            out[f"e2e_p{p}"].append(float(np.percentile(e2e, p)))
        out["ttft_p50"].append(float(np.percentile(ttft, 50)) if ttft.size else 0.0)
        out["ttft_p99"].append(float(np.percentile(ttft, 99)) if ttft.size else 0.0)
    return out

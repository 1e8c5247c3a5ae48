"""Hand-built records and results for the harness's unit tests (no server)."""

from __future__ import annotations

import random
from typing import Any

from loadtest.harness.record import RequestRecord, records_to_columns
from loadtest.harness.scenario import scenario_from_dict
from loadtest.harness.stats import stage_duration, summarize, timeseries


def make_record(
    method: str = "Generate",
    start: float = 0.0,
    e2e: float = 0.1,
    ttft: float | None = 0.02,
    itl: list[float] | None = None,
    output_tokens: int = 8,
    input_tokens: int = 20,
    status: str = "OK",
) -> RequestRecord:
    return RequestRecord(
        method=method,
        start=start,
        end=start + e2e,
        status=status,
        ttft=ttft,
        itl=list(itl or []),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def random_records(n: int, seed: int = 0, error_every: int = 0) -> list[RequestRecord]:
    """Streams with random latencies; every `error_every`-th one failed as UNAVAILABLE."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        out = rng.randint(1, 12)
        ttft = rng.uniform(0.01, 0.3)
        itl = [rng.uniform(0.005, 0.05) for _ in range(out - 1)]
        failed = error_every and i % error_every == 0
        records.append(
            make_record(
                start=rng.uniform(0, 5),
                ttft=ttft,
                itl=itl,
                e2e=ttft + sum(itl),
                output_tokens=out,
                input_tokens=rng.randint(5, 300),
                status="grpc:UNAVAILABLE" if failed else "OK",
            )
        )
    return records


def make_result(stages: list[tuple[dict[str, Any], list[RequestRecord]]]) -> dict[str, Any]:
    """A results mapping as `run_scenario` returns it, from (load, records) per stage."""
    loads = [load for load, _ in stages]
    if len(loads) == 1:
        load = loads[0]
    else:
        load = {"mode": "sweep", "concurrency": [ld["concurrency"] for ld in loads]}
    scenario = scenario_from_dict(
        {"target": "grpc://127.0.0.1:50051", "mix": "Generate", "load": load, "duration_s": 5}
    )
    out = []
    for stage, (_, records) in zip(scenario.stages(), stages, strict=True):
        out.append(
            {
                "label": stage.label,
                "concurrency": stage.concurrency,
                "rate": stage.rate,
                "max_concurrency": stage.max_concurrency,
                "summary": summarize(records, stage_duration(records), scenario.slo),
                "timeseries": timeseries(records),
                "records": records_to_columns(records),
            }
        )
    return {
        "harness": "irouter loadtest",
        "format": 1,
        "started": "2026-11-25T12:00:00Z",
        "scenario": scenario.to_dict(),
        "stages": out,
    }

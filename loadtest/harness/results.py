"""A whole run as one JSON-ready mapping: the scenario, then per stage its summary, its time
series and every request's record (columns), so reports and comparisons can be redone later."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loadtest.harness.record import records_to_columns
from loadtest.harness.runner import run_stage
from loadtest.harness.scenario import Scenario
from loadtest.harness.stats import stage_duration, summarize, timeseries

FORMAT = 1


async def run_scenario(scenario: Scenario, *, progress: bool = False) -> dict[str, Any]:
    """Run every stage of `scenario` and return the results mapping."""
    stages: list[dict[str, Any]] = []
    started = time.time()
    for stage in scenario.stages():
        records = await run_stage(scenario, stage, progress=progress)
        duration = stage_duration(records)
        stages.append(
            {
                "label": stage.label,
                "concurrency": stage.concurrency,
                "rate": stage.rate,
                "max_concurrency": stage.max_concurrency,
                "summary": summarize(records, duration, scenario.slo),
                "timeseries": timeseries(records),
                "records": records_to_columns(records),
            }
        )
    return {
        "harness": "irouter loadtest",
        "format": FORMAT,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "scenario": scenario.to_dict(),
        "stages": stages,
    }


def save_results(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, separators=(",", ":")))


def load_results(path: Path) -> dict[str, Any]:
    """A results file; ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "stages" not in data:
        raise ValueError(f"{path}: not an irouter loadtest results file (format {FORMAT})")
    return data

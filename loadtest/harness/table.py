"""The terminal summary: one column per stage, vLLM `bench serve`'s rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = tuple[str, Callable[[dict[str, Any]], float | None], str]


def _dist(name: str, stat: str) -> Callable[[dict[str, Any]], float | None]:
    def get(summary: dict[str, Any]) -> float | None:
        d = summary.get(name)
        return None if d is None else float(d[stat])

    return get


def _key(name: str) -> Callable[[dict[str, Any]], float | None]:
    def get(summary: dict[str, Any]) -> float | None:
        value = summary.get(name)
        return None if value is None else float(value)

    return get


ROWS: list[Row] = [
    ("requests completed", _key("completed"), "{:.0f}"),
    ("requests failed", _key("failed"), "{:.0f}"),
    ("duration (s)", _key("duration_s"), "{:.2f}"),
    ("request throughput (req/s)", _key("request_throughput"), "{:.2f}"),
    ("goodput (req/s)", _key("goodput"), "{:.2f}"),
    ("input token throughput (tok/s)", _key("input_token_throughput"), "{:.1f}"),
    ("output token throughput (tok/s)", _key("output_token_throughput"), "{:.1f}"),
]
for _name, _title in (
    ("ttft_ms", "TTFT"),
    ("tpot_ms", "TPOT"),
    ("itl_ms", "ITL"),
    ("e2e_ms", "E2E latency"),
):
    for _stat in ("mean", "p50", "p90", "p99"):
        ROWS.append((f"{_title} {_stat} (ms)", _dist(_name, _stat), "{:.2f}"))
ROWS.append(("send lag p99 (ms)", _dist("send_lag_ms", "p99"), "{:.2f}"))


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def summary_table(result: dict[str, Any]) -> str:
    """Every metric row that has a value in some stage, then errors by status."""
    stages = result["stages"]
    headers = ["metric", *(s["label"] for s in stages)]
    rows: list[list[str]] = []
    for title, get, fmt in ROWS:
        values = [get(s["summary"]) for s in stages]
        if all(v is None for v in values):
            continue
        rows.append([title, *("-" if v is None else fmt.format(v) for v in values)])
    statuses = sorted({code for s in stages for code in s["summary"]["errors"]})
    for code in statuses:
        rows.append([f"errors {code}", *(str(s["summary"]["errors"].get(code, 0)) for s in stages)])
    scenario = result["scenario"]
    head = f"{scenario['target']}  mix {scenario['mix']}  processes {scenario['processes']}"
    return head + "\n" + format_table(headers, rows)

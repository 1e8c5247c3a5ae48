"""The HTML report: one self-contained file (inline CSS and inline SVG plots drawn by matplotlib,
no script, no external URL) with the summary table, errors, latency percentiles over time, TTFT
and ITL distributions, and throughput/latency against load for sweeps."""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from loadtest.harness.table import ROWS

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
figure { margin: 1em 0; } figcaption { color: #555; }
svg { max-width: 100%; height: auto; }
"""

_PROLOG = re.compile(r"^.*?(?=<svg)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')


def svg(fig: Figure) -> str:
    """The figure as an inline <svg> element: text kept as text, and without the XML prolog,
    DOCTYPE, RDF metadata and namespace declarations (URLs that HTML5 does not need)."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "irouter"}):
        fig.savefig(buf, format="svg")
    text = _PROLOG.sub("", buf.getvalue(), count=1)
    text = _METADATA.sub("", text)
    return _XMLNS.sub("", text)


def _column(stage: dict[str, Any], name: str) -> list[Any]:
    records = stage.get("records") or {}
    return list(records.get(name, []))


def _ok_values(stage: dict[str, Any], name: str) -> list[Any]:
    values = _column(stage, name)
    status = _column(stage, "status")
    return [v for v, s in zip(values, status, strict=True) if s == "OK" and v is not None]


def plot_latency_over_time(stage: dict[str, Any]) -> Figure | None:
    ts = stage["timeseries"]
    if not ts["t"]:
        return None
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for key, label, style in (
        ("e2e_p50", "E2E p50", "-"),
        ("e2e_p90", "E2E p90", "-"),
        ("e2e_p99", "E2E p99", "-"),
        ("ttft_p50", "TTFT p50", "--"),
        ("ttft_p99", "TTFT p99", "--"),
    ):
        if any(ts[key]):
            ax.plot(ts["t"], ts[key], style, label=label, marker=".")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Latency percentiles over time, {stage['label']}")
    ax.grid(alpha=0.3)
    rate = ax.twinx()
    rate.bar(ts["t"], ts["requests_per_s"], width=ts["t"][0] * 0.9, alpha=0.15, color="gray")
    rate.set_ylabel("answers/s (bars)")
    ax.set_zorder(rate.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_distribution(stages: list[dict[str, Any]], what: str) -> Figure | None:
    """Histogram of TTFT (what='ttft') or of pooled inter-token gaps (what='itl'), in ms."""
    series: list[tuple[str, list[float]]] = []
    for stage in stages:
        if what == "ttft":
            values = [v * 1000 for v in _ok_values(stage, "ttft")]
        else:
            values = [g * 1000 for gaps in _ok_values(stage, "itl") for g in gaps]
        if values:
            series.append((stage["label"], values))
    if not series:
        return None
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for label, values in series:
        ax.hist(values, bins=40, alpha=0.5 if len(series) > 1 else 0.8, label=label)
    name = "Time to first token" if what == "ttft" else "Inter-token latency"
    ax.set_title(f"{name} distribution")
    ax.set_xlabel(f"{'TTFT' if what == 'ttft' else 'ITL'} (ms)")
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return fig


def plot_sweep(result: dict[str, Any]) -> Figure | None:
    stages = result["stages"]
    if len(stages) < 2:
        return None
    by_conc = stages[0]["concurrency"] is not None
    x = [s["concurrency"] if by_conc else s["rate"] for s in stages]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(x, [s["summary"]["request_throughput"] for s in stages], marker="o", label="req/s")
    left.set_ylabel("requests/s")
    tokens = [s["summary"]["output_token_throughput"] for s in stages]
    if any(tokens):
        twin = left.twinx()
        twin.plot(x, tokens, marker="s", color="tab:orange", label="output tok/s")
        twin.set_ylabel("output tokens/s", color="tab:orange")
    left.set_title("Throughput vs " + ("concurrency" if by_conc else "offered rate"))
    for key, label in (("e2e_ms", "E2E"), ("ttft_ms", "TTFT")):
        for stat in ("p50", "p99"):
            ys = [s["summary"][key][stat] if s["summary"][key] else None for s in stages]
            if any(y is not None for y in ys):
                right.plot(x, ys, marker=".", label=f"{label} {stat}")
    right.set_title("Latency vs " + ("concurrency" if by_conc else "offered rate"))
    right.set_ylabel("ms")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.set_xlabel("concurrency" if by_conc else "offered rate (req/s)")
        ax.grid(alpha=0.3)
        if min(x) > 0 and max(x) / min(x) >= 8:  # doubling sweeps read best on a log axis
            ax.set_xscale("log", base=2)
    return fig


def _summary_html(result: dict[str, Any]) -> str:
    stages = result["stages"]
    head = "".join(f"<th>{html.escape(s['label'])}</th>" for s in stages)
    rows = []
    for title, get, fmt in ROWS:
        values = [get(s["summary"]) for s in stages]
        if all(v is None for v in values):
            continue
        cells = "".join(f"<td>{'-' if v is None else fmt.format(v)}</td>" for v in values)
        rows.append(f"<tr><td>{html.escape(title)}</td>{cells}</tr>")
    codes = sorted({c for s in stages for c in s["summary"]["errors"]})
    for code in codes:
        cells = "".join(f"<td>{s['summary']['errors'].get(code, 0)}</td>" for s in stages)
        rows.append(f"<tr><td>errors {html.escape(code)}</td>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _errors_html(result: dict[str, Any]) -> str:
    samples: dict[str, str] = {}
    for stage in result["stages"]:
        for status, error in zip(_column(stage, "status"), _column(stage, "error"), strict=True):
            if status != "OK" and status not in samples:
                samples[status] = error
    if not samples:
        return "<p>No errors.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in sorted(samples.items())
    )
    return f"<table><tr><th>status</th><th>first message</th></tr>{rows}</table>"


def render_html(result: dict[str, Any]) -> str:
    figures: list[tuple[str, Figure | None]] = [
        ("Throughput and latency against load", plot_sweep(result)),
    ]
    figures += [
        (f"Latency percentiles over time ({s['label']})", plot_latency_over_time(s))
        for s in result["stages"]
    ]
    figures.append(("TTFT distribution", plot_distribution(result["stages"], "ttft")))
    figures.append(("ITL distribution", plot_distribution(result["stages"], "itl")))
    plots = "".join(
        f"<figure>{svg(fig)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, fig in figures
        if fig is not None
    )
    scenario = html.escape(json.dumps(result["scenario"], indent=2))
    title = f"irouter load test, {html.escape(result['scenario']['target'])}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title}</h1><p>started {html.escape(result['started'])}</p>"
        f"<h2>Summary</h2>{_summary_html(result)}"
        f"<h2>Errors</h2>{_errors_html(result)}"
        f"<h2>Plots</h2>{plots or '<p>No successful requests to plot.</p>'}"
        f"<h2>Scenario</h2><pre>{scenario}</pre>"
        "</body></html>\n"
    )


def write_html(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result))

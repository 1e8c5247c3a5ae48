"""The HTML report is one self-contained file holding the plots."""

from __future__ import annotations

import re
from pathlib import Path

from loadtest.harness.cli import main
from loadtest.harness.report_html import render_html
from loadtest.harness.results import save_results
from tests.unit.loadtest.factories import make_record, make_result, random_records

# Anything a browser would fetch: src/href attributes not pointing inside the page, CSS url()
# and @import, <link>, <script src>, <iframe>, <object>.
_EXTERNAL = re.compile(
    r"\b(?:src|href)\s*=\s*(?![\"']?(?:#|data:))"
    r"|url\(\s*(?![\"']?#)|@import|<link\b|<script\b|<iframe\b|<object\b",
    re.I,
)


def _sweep() -> dict[str, object]:
    return make_result(
        [({"mode": "closed", "concurrency": c}, random_records(120, seed=c)) for c in (1, 4, 16)]
    )


def test_report_is_self_contained_and_holds_the_plots() -> None:
    page = render_html(_sweep())
    assert _EXTERNAL.search(page) is None, _EXTERNAL.search(page)
    assert "http://" not in page and "https://" not in page
    # One sweep figure, one latency-over-time figure per stage, TTFT and ITL distributions.
    assert page.count("<svg") == 1 + 3 + 2
    for title in (
        "Throughput vs concurrency",
        "Latency percentiles over time, concurrency=4",
        "Time to first token distribution",
        "Inter-token latency distribution",
    ):
        assert title in page, title
    # The summary table is in the page with one column per stage.
    assert "<th>concurrency=16</th>" in page and "request throughput (req/s)" in page


def test_report_lists_errors_and_survives_a_run_without_answers() -> None:
    records = [make_record(status="grpc:NOT_FOUND") for _ in range(3)]
    records[0].error = "model 'nope' is not served"
    page = render_html(make_result([({"mode": "closed", "concurrency": 1}, records)]))
    assert "grpc:NOT_FOUND" in page and "model &#x27;nope&#x27; is not served" in page
    assert "No successful requests to plot." in page
    assert "<svg" not in page


def test_report_command_rewrites_html_from_results(tmp_path: Path) -> None:
    save_results(_sweep(), tmp_path / "run.json")
    assert main(["report", str(tmp_path / "run.json")]) == 0
    page = (tmp_path / "run.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 6

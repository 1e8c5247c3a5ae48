"""`irouter loadtest compare`: B/A ratios of the same metrics, stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.harness.cli import main
from loadtest.harness.compare import compare_results
from loadtest.harness.results import save_results
from tests.unit.loadtest.factories import make_record, make_result


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        parts = line.rsplit(None, 3)
        if len(parts) == 4:
            rows[parts[0].strip()] = parts[1:]
    return rows


def test_ratios_are_b_over_a() -> None:
    a = make_result([({"mode": "closed", "concurrency": 4}, [make_record(e2e=0.1, ttft=0.02)])])
    b = make_result(
        [
            (
                {"mode": "closed", "concurrency": 4},
                [make_record(e2e=0.3, ttft=0.02, output_tokens=16)],
            )
        ]
    )
    text = compare_results(a, b)
    assert text.splitlines()[0] == "## concurrency=4"
    rows = _rows(text)
    assert rows["E2E latency p50 (ms)"] == ["100.00", "300.00", "3.000"]
    assert rows["TTFT p50 (ms)"] == ["20.00", "20.00", "1.000"]
    # 8 tokens over 0.1 s against 16 tokens over 0.3 s.
    assert float(rows["output token throughput (tok/s)"][2]) == pytest.approx(
        (16 / 0.3) / 80, abs=1e-3
    )
    assert rows["requests failed"] == ["0", "0", "-"]


def test_compare_command_reads_results_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = {"mode": "closed", "concurrency": 1}
    two = {"mode": "closed", "concurrency": 2}
    a = make_result([(one, [make_record(e2e=0.2)]), (two, [make_record(e2e=0.4)])])
    b = make_result([(one, [make_record(e2e=0.1)]), (two, [make_record(e2e=0.1)])])
    save_results(a, tmp_path / "before.json")
    save_results(b, tmp_path / "after.json")
    assert main(["compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")]) == 0
    out = capsys.readouterr().out
    assert "## concurrency=1" in out and "## concurrency=2" in out
    assert "after/before" in out
    ratios = [line.split()[-1] for line in out.splitlines() if line.startswith("E2E latency p50")]
    assert ratios == ["0.500", "0.250"]
    (tmp_path / "junk.json").write_text(json.dumps({"hello": 1}))
    assert main(["compare", str(tmp_path / "junk.json"), str(tmp_path / "after.json")]) == 2
    assert "not an irouter loadtest results file" in capsys.readouterr().err

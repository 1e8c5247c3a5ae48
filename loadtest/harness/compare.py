"""`irouter loadtest compare A.json B.json`: every metric of A and B side by side with B/A.
Stages pair up by position (a sweep against a sweep of the same levels, or two single runs)."""

from __future__ import annotations

from typing import Any

from loadtest.harness.table import ROWS, format_table


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if a == 0:
        return "-" if b == 0 else "inf"
    return f"{b / a:.3f}"


def compare_results(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")
) -> str:
    """A table per stage pair: metric, A, B, B/A."""
    out: list[str] = []
    if len(a["stages"]) != len(b["stages"]):
        out.append(
            f"note: {names[0]} has {len(a['stages'])} stages, {names[1]} has "
            f"{len(b['stages'])}; comparing the first {min(len(a['stages']), len(b['stages']))}"
        )
    for sa, sb in zip(a["stages"], b["stages"], strict=False):
        rows: list[list[str]] = []
        for title, get, fmt in ROWS:
            va, vb = get(sa["summary"]), get(sb["summary"])
            if va is None and vb is None:
                continue
            rows.append(
                [
                    title,
                    "-" if va is None else fmt.format(va),
                    "-" if vb is None else fmt.format(vb),
                    _ratio(va, vb),
                ]
            )
        label = sa["label"] if sa["label"] == sb["label"] else f"{sa['label']} vs {sb['label']}"
        out.append(f"## {label}")
        out.append(format_table(["metric", names[0], names[1], f"{names[1]}/{names[0]}"], rows))
    return "\n".join(out)

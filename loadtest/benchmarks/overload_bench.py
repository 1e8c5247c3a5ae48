"""Overload against a real `irouter serve` (default config; issue 17, item 4): closed-loop
clients at 1x and 3x the model's queue capacity (max_slots + max_waiting concurrent 32-token
streams), each retrying at once when shed. Reported: the admitted calls' time to first token p99
(goal: within max_queue_wait_s, 10 s by default), how many were shed, and goodput (calls
finished with TTFT within that bound, per second) at 3x as a ratio to 1x (goal >= 0.9).

    python -m loadtest.benchmarks.overload_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.benchmarks.serve_bench import GEN, ROOT, line, router_process
from router.config import ModelConfig

BOUND_S = ModelConfig.max_queue_wait_s
CAPACITY = ModelConfig.max_slots + ModelConfig.max_waiting


def run_stage(
    target: str, concurrency: int, duration_s: int, out: Path, *, honor: bool
) -> dict[str, object]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "router",
            "loadtest",
            "run",
            "--target",
            f"grpc://{target}",
            "--model",
            GEN,
            "--method",
            "Generate",
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration_s),
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--temperature",
            "0.8",  # sampled, so that no answer comes from the response cache
            "--timeout",
            "120",
            "--slo",
            f"ttft_ms={BOUND_S * 1000:g}",
            "--out",
            str(out),
            "--no-html",
            "--no-progress",
            *(["--honor-retry-info"] if honor else []),
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    summary: dict[str, object] = json.loads(out.read_text())["stages"][0]["summary"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    duration = 30 if args.quick else 90
    print(f"# overload benchmark, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, router_process() as target:
        results: dict[tuple[int, bool], dict[str, object]] = {}
        for factor, honor in ((1, True), (3, True), (3, False)):
            how = "clients honour RetryInfo" if honor else "clients retry at once"
            out = Path(tmp) / f"{factor}x-{honor}.json"
            summary = run_stage(target, CAPACITY * factor, duration, out, honor=honor)
            results[factor, honor] = summary
            ttft = summary["ttft_ms"] or {}
            assert isinstance(ttft, dict)
            line(
                f"{factor}x ({CAPACITY * factor} in flight), {how}: TTFT p99",
                ttft.get("p99") or 0,
                "ms",
                None,
                f"goal <= {BOUND_S * 1000:g} ms",
            )
            print(
                f"  completed {summary['completed']}, failed {summary['failed']} "
                f"{summary['errors']}, goodput {summary['goodput']:.2f}/s",
                flush=True,
            )
        good1 = float(results[1, True]["goodput"])  # type: ignore[arg-type]
        for honor in (True, False):
            good3 = float(results[3, honor]["goodput"])  # type: ignore[arg-type]
            how = "honouring RetryInfo" if honor else "retrying at once"
            line(f"goodput at 3x, {how}", good3, "req/s", good1, "vs 1x; goal >= 0.9")


if __name__ == "__main__":
    main()

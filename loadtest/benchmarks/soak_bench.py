"""A soak of `irouter serve` (default config; issue 17): mixed load (Generate, Complete, Embed,
ListModels) for a while, the router's resident memory sampled every 10 s next to the bytes its
caches hold (`irouter_cache_bytes`). Reported: RSS growth from minute 1 to the end (goal: < 5%),
and how much of it the caches' growth explains (they fill up to their configured bounds, 64 MiB
response and 32 MiB embedding cache by default, and then stop).

    python -m loadtest.benchmarks.soak_bench [--quick] [--minutes N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from loadtest.benchmarks.serve_bench import GEN, ROOT, line
from loadtest.processes import free_port, wait_serving

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cache_bytes(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "irouter_cache_bytes"
        for sample in family.samples
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 minutes")
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    minutes = 3.0 if args.quick else args.minutes
    print(f"# soak benchmark, {minutes:g} minutes, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    port, metrics_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(f"retrieval:\n  data_dir: {Path(tmp) / 'collections'}\n  fsync: false\n")
        cmd = [sys.executable, "-m", "router", "serve", "--config", str(config), "--host"]
        cmd += ["127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)]
        router = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            target = f"127.0.0.1:{port}"
            wait_serving(target)
            samples: list[tuple[float, int, float]] = []
            stop = threading.Event()

            def sample() -> None:
                started = time.monotonic()
                while not stop.wait(10.0):
                    elapsed = time.monotonic() - started
                    samples.append((elapsed, rss_bytes(router.pid), cache_bytes(metrics_port)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            load = [sys.executable, "-m", "router", "loadtest", "run", "--target"]
            load += [f"grpc://{target}", "--model", GEN, "--concurrency", "8"]
            load += ["--method", "Generate=4", "--method", "Complete=2", "--method", "Embed=2"]
            load += ["--method", "ListModels=1", "--max-tokens", "uniform:4:48"]
            load += ["--temperature", "0.7", "--duration", str(int(minutes * 60))]
            load += ["--out", str(Path(tmp) / "soak.json"), "--no-html", "--no-progress"]
            subprocess.run(load, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            stop.set()
            sampler.join()
        finally:
            router.terminate()
            router.wait(timeout=60)
    first = next(s for s in samples if s[0] >= 60)
    last = samples[-1]
    growth = (last[1] - first[1]) / first[1] * 100
    caches = (last[2] - first[2]) / MIB
    line("RSS at minute 1", first[1] / MIB, "MiB")
    line(f"RSS at minute {last[0] / 60:.1f}", last[1] / MIB, "MiB")
    line("RSS growth from minute 1", growth, "%", None, "goal < 5%")
    line("  of which the caches filled", caches, "MiB", None, "(bounded by their max_bytes)")
    line("  the rest", (last[1] - first[1]) / MIB - caches, "MiB")


if __name__ == "__main__":
    main()

"""`make bench`: every benchmark, each figure a ratio against a baseline from the same run.
Arguments (e.g. --quick) go to the serving, guard and retrieval benchmarks."""

from __future__ import annotations

import subprocess
import sys

if __name__ == "__main__":
    print("## native core", flush=True)
    subprocess.run([sys.executable, "-m", "loadtest.benchmarks.native_bench"], check=True)
    print("\n## matcher", flush=True)
    subprocess.run([sys.executable, "-m", "loadtest.benchmarks.matcher_bench"], check=True)
    for title, module in (
        ("serving", "serve_bench"),
        ("batching against standalone engines", "batching_bench"),
        ("prefix cache", "prefix_bench"),
        ("structured outputs", "structured_bench"),
        ("OpenVINO vs ONNX Runtime", "openvino_bench"),
        ("guard", "guard_bench"),
        ("retrieval", "retrieval_bench"),
        ("routing", "routing_bench"),
        ("control plane", "control_plane_bench"),
        ("load-test harness", "harness_bench"),
        ("REST proxy", "proxy_bench"),
        ("gateway to an OpenAI-compatible server", "gateway_bench"),
        ("caches and RAG", "cache_bench"),
        ("remote OpenAI-HTTP engine", "remote_bench"),
        ("hostile input", "hostile_bench"),
        ("overload", "overload_bench"),
    ):
        print(f"\n## {title}", flush=True)
        subprocess.run(
            [sys.executable, "-m", f"loadtest.benchmarks.{module}", *sys.argv[1:]], check=True
        )

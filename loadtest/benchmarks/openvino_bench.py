"""OpenVINO against ONNX Runtime through the router: the same prompts, models and load in the
same run: both router processes up, driven in turn, round after round. Each OpenVINO figure
is printed as a ratio against the ONNX Runtime one (medians over rounds).

    python -m loadtest.benchmarks.openvino_bench [--quick]

Generation: SmolLM2 greedy, ignore_eos, response cache bypassed; ONNX Runtime is the router's
int4 step engine under the native scheduler, OpenVINO is GenAI's ContinuousBatchingPipeline
reading the same GGUF (default precision). Embedding: MiniLM, 64 concurrent callers of one text
each, embedding cache off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtest.benchmarks.serve_bench import (
    EMB,
    GEN,
    embed_load,
    generate_load,
    line,
    router_process,
)
from router.config_file import load_config

BACKENDS = ("onnxruntime", "openvino")


def config_text(backend: str) -> str:
    """Both models on `backend`, under the names the serving benchmarks call."""
    return (
        "cache: {embedding: {enabled: false}}\n"
        "retrieval: {enabled: false}\n"
        "models:\n"
        f"  - {{name: {GEN}, kind: generate, artifact: {GEN}, backend: {backend}}}\n"
        f"  - {{name: {EMB}, kind: embed, artifact: {EMB}, backend: {backend}}}\n"
    )


def measure(quick: bool, folder: Path) -> dict[str, dict[str, list[float]]]:
    """Both routers up at once (an idle router costs nothing), driven in turn, round after
    round: drift in what else the machine is doing hits both sides alike."""
    n = 64 if quick else 128
    rounds = 1 if quick else 3
    seconds = 3.0 if quick else 6.0
    results: dict[str, dict[str, list[float]]] = {b: {} for b in BACKENDS}
    with contextlib.ExitStack() as stack:
        targets = {}
        for backend in BACKENDS:
            config = folder / f"{backend}.yaml"
            config.write_text(config_text(backend))
            started = time.perf_counter()
            targets[backend] = stack.enter_context(router_process(config=config))
            results[backend]["ready"] = [time.perf_counter() - started]
        for _ in range(rounds):
            for backend, target in targets.items():
                r = results[backend]
                one, ttft1 = asyncio.run(generate_load(target, 1, n, 1))
                sixteen, ttft16 = asyncio.run(generate_load(target, 16, n, 1))
                r.setdefault("one", []).append(one)
                r.setdefault("sixteen", []).append(sixteen)
                r.setdefault("ttft1", []).extend(t * 1000 for t in ttft1)
                r.setdefault("ttft16", []).extend(t * 1000 for t in ttft16)
        for _ in range(rounds):
            for backend, target in targets.items():
                embed = asyncio.run(embed_load(target, 64, seconds / rounds))
                results[backend].setdefault("embed", []).append(embed)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter runs (CI smoke)")
    args = parser.parse_args()
    cache = load_config().model_cache
    from router.models.prepare import prepare_models

    prepare_models(cache, progress=False)
    os.environ.setdefault("IROUTER_MODEL_CACHE", str(cache))
    print(f"# OpenVINO vs ONNX Runtime, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args.quick, Path(tmp))
    ort = {k: float(np.median(v)) for k, v in results["onnxruntime"].items()}
    ov = {k: float(np.median(v)) for k, v in results["openvino"].items()}
    rows = (
        ("router start to SERVING (load + warm-up)", "ready", "s"),
        ("Generate, 1 stream", "one", "tok/s"),
        ("Generate, 16 streams (aggregate)", "sixteen", "tok/s"),
        ("time to first token p50, 1 stream", "ttft1", "ms"),
        ("time to first token p50, 16 streams", "ttft16", "ms"),
        ("Embed, 64 concurrent callers, 1 text each", "embed", "texts/s"),
    )
    for label, key, unit in rows:
        line(f"ONNX Runtime: {label}", ort[key], unit)
        line(f"OpenVINO:     {label}", ov[key], unit, ort[key], "(OpenVINO / ONNX Runtime)")
    line("ONNX Runtime: 16 streams vs 1", ort["sixteen"] / ort["one"], "x")
    line("OpenVINO:     16 streams vs 1", ov["sixteen"] / ov["one"], "x")


if __name__ == "__main__":
    main()

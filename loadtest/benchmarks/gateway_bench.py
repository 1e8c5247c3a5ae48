"""What the router adds as a gateway in front of an OpenAI-compatible server: an instant upstream
(loadtest/benchmarks/instant_upstream.py) on core 0, `irouter serve --http-port` on core 1 with
the upstream as a model with no local artifact ("up") and as one with the packaged SmolLM2's
tokenizer and template ("up-artifact"), and h2load (a C client) on core 0 beside the upstream.

    non-streamed chat p50 at 1 in flight      direct to the upstream, then through the router:
                                              the difference is what the gateway adds
    non-streamed chat req/s at 32 in flight   through the router, against the upstream direct
    streamed chat (20 chunks) req/s at 16     the same, streamed: the upstream sends all 20
                                              events at once, so they reach the router in
                                              one read or a few (and pass as one chunk each)
    the same, paced                           each event PACE_S after the last, as a real
                                              server streams; under load the router still
                                              finds several of a stream's events per read
    gateway CPU per request                   the router process's user+system time / requests

Every figure comes from this run; the upstream's own figures are the baseline each ratio is
against. The response cache is off (every call reaches the upstream).

    python -m loadtest.benchmarks.gateway_bench [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from loadtest.benchmarks.instant_upstream import MODEL, PACE_S, PACED
from loadtest.benchmarks.serve_bench import ROOT, line
from loadtest.processes import free_port
from router.config_file import load_config
from router.models.prepare import DECODER_NAME, prepare_models

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 20}


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def _wait_serving(url: str, bodies: list[Path], timeout_s: float = 120.0) -> None:
    """Until each body gets a 200 (the models list answers before the models are ready)."""
    deadline = time.monotonic() + timeout_s
    for body in bodies:
        while httpx.post(url, content=body.read_bytes(), timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not serve {body.name} within {timeout_s:.0f} s")
            time.sleep(0.2)


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(ready_url, proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def router_config(path: Path, upstream: str, *, passthrough: bool) -> None:
    remote = {"url": upstream, "model": MODEL, "dialect": "openai", "max_connections": 64}
    models = [
        {"name": "up-artifact", "kind": "generate", "backend": "openai_http",
         "artifact": DECODER_NAME, "remote": remote, "max_slots": 64, "max_waiting": 1024},
    ]  # fmt: skip
    if passthrough:
        models.append({**models[0], "name": "up", "artifact": ""})
        paced = {**remote, "model": PACED}
        models.append({**models[0], "name": "up-paced", "artifact": "", "remote": paced})
    config = {
        "models": models,
        "cache": {"response": {"enabled": False}},
        "retrieval": {"enabled": False},
    }
    path.write_text(json.dumps(config))  # JSON is YAML


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def h2load(url: str, body: Path, *, requests: int, clients: int) -> tuple[float, float]:
    """(p50 ms, requests/s) from h2load over HTTP/1.1, `clients` connections, 1 in flight on
    each; every answer must be a 200."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        args = ["taskset", "-c", "0", "h2load", "--h1", "-n", str(requests), "-c", str(clients)]
        args += ["-m", "1", "--log-file", log.name, "-H", "content-type: application/json"]
        started = time.perf_counter()
        subprocess.run([*args, "-d", str(body), url], check=True, capture_output=True)
        elapsed = time.perf_counter() - started
        rows = [r.split("\t") for r in Path(log.name).read_text().splitlines() if r.strip()]
    statuses = {row[1] for row in rows}
    if statuses != {"200"} or len(rows) != requests:
        raise RuntimeError(f"h2load saw statuses {sorted(statuses)} ({len(rows)} rows) from {url}")
    p50_ms = float(np.percentile([int(row[2]) for row in rows], 50)) / 1000  # µs → ms
    return p50_ms, requests / elapsed


def bench(quick: bool, passthrough: bool, litellm: str | None) -> None:
    n1 = 1_000 if quick else 4_000
    n32 = 2_000 if quick else 8_000
    upstream_port, grpc_port, http_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    gateway = f"http://127.0.0.1:{http_port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "router.yaml"
        router_config(config, upstream, passthrough=passthrough)
        up = "up" if passthrough else "up-artifact"  # the model measured at 32 and 16
        bodies = {}
        for name, model, stream in (
            ("direct", MODEL, False),
            ("direct-stream", MODEL, True),
            ("up", up, False),
            ("up-stream", up, True),
            ("up-artifact", "up-artifact", False),
            ("direct-paced", PACED, True),
            ("up-paced", "up-paced" if passthrough else up, True),
        ):
            path = bodies[name] = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps({**CHAT, "model": model, "stream": stream}))
        up_cmd = ["taskset", "-c", "0", sys.executable, "-m",
                  "loadtest.benchmarks.instant_upstream", str(upstream_port)]  # fmt: skip
        router_cmd = ["taskset", "-c", "1", sys.executable, "-m", "router", "serve",
                      "--config", str(config), "--host", "127.0.0.1", "--port", str(grpc_port),
                      "--http-port", str(http_port), "--metrics-port", "0"]  # fmt: skip
        with (
            process(up_cmd, f"{upstream}/v1/models"),
            process(router_cmd, f"{gateway}/v1/models") as router,
        ):
            chat = f"{upstream}/v1/chat/completions"
            routed = f"{gateway}/v1/chat/completions"
            _wait_serving(routed, [bodies[name] for name in ("up", "up-artifact")])
            for name in ("up", "up-stream", "up-artifact"):  # warm every path
                h2load(routed, bodies[name], requests=200, clients=4)
            direct_p50, _ = h2load(chat, bodies["direct"], requests=n1, clients=1)
            cpu = cpu_seconds(router.pid)
            p50, _ = h2load(routed, bodies["up"], requests=n1, clients=1)
            cpu_one = (cpu_seconds(router.pid) - cpu) / n1
            artifact_p50, _ = h2load(routed, bodies["up-artifact"], requests=n1, clients=1)
            _, direct_rps = h2load(chat, bodies["direct"], requests=n32 * 4, clients=32)
            cpu = cpu_seconds(router.pid)
            _, rps = h2load(routed, bodies["up"], requests=n32, clients=32)
            cpu_per_request = (cpu_seconds(router.pid) - cpu) / n32
            _, direct_stream = h2load(chat, bodies["direct-stream"], requests=n32, clients=16)
            _, stream_rps = h2load(routed, bodies["up-stream"], requests=n32 // 2, clients=16)
            _, direct_paced = h2load(chat, bodies["direct-paced"], requests=n32 // 4, clients=16)
            _, paced_rps = h2load(routed, bodies["up-paced"], requests=n32 // 4, clients=16)
            lite = None
            if litellm:
                lite = bench_litellm(litellm, upstream, Path(tmp), n1=n1 // 4, n32=n32 // 4)
    line("upstream direct, non-streamed chat p50 (1 in flight)", direct_p50, "ms")
    line("via the router, no artifact: p50", p50, "ms", direct_p50)
    line("  added by the router", p50 - direct_p50, "ms", None, "goal <= 1.0 ms")
    line("  router CPU per request at 1 in flight", cpu_one * 1000, "ms")
    line("via the router, with artifact: p50", artifact_p50, "ms", direct_p50)
    line("  added by the router", artifact_p50 - direct_p50, "ms", None, "goal <= 1.5 ms")
    line("upstream direct, non-streamed req/s (32 in flight)", direct_rps, "req/s")
    line("via the router, no artifact: req/s (32 in flight)", rps, "req/s", direct_rps)
    line("  router CPU per request", cpu_per_request * 1000, "ms")
    line("upstream direct, streamed req/s (16 in flight)", direct_stream, "req/s")
    line("via the router, streamed req/s (16 in flight)", stream_rps, "req/s", direct_stream)
    pace = f"events {PACE_S * 1000:g} ms apart"
    line(f"upstream direct, streamed, {pace} (16 in flight)", direct_paced, "req/s")
    line(f"via the router, streamed, {pace}", paced_rps, "req/s", direct_paced)
    if lite is not None:
        # Each ratio: LiteLLM's figure against the router's, both measured above.
        line("LiteLLM proxy, non-streamed p50 (1 in flight)", lite[0], "ms", p50)
        line("LiteLLM proxy, non-streamed req/s (32 in flight)", lite[1], "req/s", rps)
        line("  irouter / LiteLLM, req/s at 32 in flight", rps / lite[1], "x", None, "goal >= 10")
        line("LiteLLM proxy, streamed req/s (16 in flight)", lite[2], "req/s", stream_rps)
        line("  irouter / LiteLLM, streamed req/s", stream_rps / lite[2], "x")


def bench_litellm(binary: str, upstream: str, tmp: Path, *, n1: int, n32: int) -> tuple[float, ...]:
    """LiteLLM's proxy on core 1 in front of the same upstream (one worker): (p50 ms at 1 in
    flight, req/s at 32, streamed req/s at 16). Optional: `--litellm PATH` to its binary, from
    a venv of its own (`pip install 'litellm[proxy]'`; not one of the router's dependencies)."""
    port = free_port()
    config = tmp / "litellm.yaml"
    params = {"model": f"openai/{MODEL}", "api_base": f"{upstream}/v1", "api_key": "unused"}
    # No authentication, as the router here runs without its guard.
    settings = {"dangerously_permit_weak_or_unset_master_key": True}
    config.write_text(
        json.dumps(
            {
                "model_list": [{"model_name": "up", "litellm_params": params}],
                "general_settings": settings,
            }
        )
    )
    cmd = ["taskset", "-c", "1", binary, "--config", str(config), "--port", str(port),
           "--num_workers", "1"]  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with process(cmd, f"http://127.0.0.1:{port}/health/liveliness"):
        body, stream = tmp / "litellm.json", tmp / "litellm-stream.json"
        body.write_text(json.dumps({**CHAT, "model": "up", "stream": False}))
        stream.write_text(json.dumps({**CHAT, "model": "up", "stream": True}))
        _wait_serving(url, [body])
        h2load(url, body, requests=100, clients=4)
        p50, _ = h2load(url, body, requests=n1, clients=1)
        _, rps = h2load(url, body, requests=n32, clients=32)
        _, stream_rps = h2load(url, stream, requests=n32 // 2, clients=16)
    return p50, rps, stream_rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument(
        "--artifact-only",
        action="store_true",
        help="only the model with an artifact (a router from before models without one)",
    )
    parser.add_argument(
        "--litellm", metavar="PATH", help="also measure LiteLLM's proxy (its `litellm` binary)"
    )
    args = parser.parse_args()
    cache = load_config().model_cache
    prepare_models(cache, progress=False)
    os.environ.setdefault("IROUTER_MODEL_CACHE", str(cache))
    print(f"CPU: {_cpu_model()}", flush=True)
    bench(args.quick, not args.artifact_only, args.litellm)


def _cpu_model() -> str:
    for row in Path("/proc/cpuinfo").read_text().splitlines():
        if row.startswith("model name"):
            return row.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()

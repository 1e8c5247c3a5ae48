"""What the REST proxy adds to a call, with the client's own cost taken out: h2load (a C client)
sends the same short chat completion at 1 in flight over gRPC straight to the router, and as
OpenAI JSON over HTTP/1.1 to `irouter proxy` in front of that router; the difference of the p50
latencies is the proxy's hop and work (goal: at most 0.5 ms). Both answers come from the
router's response cache after a warm-up, so generation time does not blur the difference.

    python -m loadtest.benchmarks.proxy_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from loadtest.benchmarks.serve_bench import GEN, ROOT, line, router_process
from loadtest.processes import free_port
from router.config_file import load_config
from router.models.prepare import prepare_models
from router.proto.irouter.v1 import inference_service_pb2 as pb

QUESTION = "Name a colour."
MAX_TOKENS = 4


@contextmanager
def proxy_process(target: str) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "router", "proxy", "--port", str(port), "--target", target]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def h2load_p50_ms(url: str, body: Path, requests: int, headers: list[str], h1: bool) -> float:
    """p50 of h2load's per-request log at 1 request in flight, after checking every one got 200
    (h2load counts a gRPC error as a success: the gRPC body is checked separately)."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        args = ["h2load", "-n", str(requests), "-c", "1", "-m", "1", "--log-file", log.name]
        if h1:
            args.append("--h1")
        for header in headers:
            args += ["-H", header]
        subprocess.run([*args, "-d", str(body), url], check=True, capture_output=True)
        rows = [r.split("\t") for r in Path(log.name).read_text().splitlines() if r.strip()]
    statuses = {row[1] for row in rows}
    if statuses != {"200"}:
        raise RuntimeError(f"h2load saw statuses {sorted(statuses)} from {url}")
    return float(np.percentile([int(row[2]) for row in rows], 50)) / 1000  # µs → ms


def bench_proxy_cost(quick: bool) -> None:
    requests = 2_000 if quick else 8_000
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION)])
    grpc_request = pb.CompleteRequest(
        model=GEN, chat=chat, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    )
    openai_body = {
        "model": GEN,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    with tempfile.TemporaryDirectory() as tmp, router_process() as target:
        grpc_body = Path(tmp) / "complete.bin"
        data = grpc_request.SerializeToString()
        grpc_body.write_bytes(struct.pack(">BI", 0, len(data)) + data)
        json_body = Path(tmp) / "chat.json"
        json_body.write_text(json.dumps(openai_body))
        with proxy_process(target) as proxy:
            # Warm both paths (and fill the cache); prove the proxy answers the same text.
            answer = httpx.post(f"{proxy}/v1/chat/completions", json=openai_body, timeout=120)
            answer.raise_for_status()
            assert answer.json()["choices"][0]["message"]["content"], answer.text
            grpc_ms = h2load_p50_ms(
                f"http://{target}/irouter.v1.InferenceService/Complete",
                grpc_body,
                requests,
                ["content-type: application/grpc", "te: trailers"],
                h1=False,
            )
            rest_ms = h2load_p50_ms(
                f"{proxy}/v1/chat/completions",
                json_body,
                requests,
                ["content-type: application/json"],
                h1=True,
            )
    line("Complete over gRPC, p50 at 1 in flight (h2load)", grpc_ms, "ms")
    line("/v1/chat/completions via the proxy, p50 (h2load --h1)", rest_ms, "ms", grpc_ms)
    line("added by the proxy, p50", rest_ms - grpc_ms, "ms", None, "goal <= 0.5 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    args = parser.parse_args()
    cache = load_config().model_cache
    prepare_models(cache, progress=False)
    os.environ.setdefault("IROUTER_MODEL_CACHE", str(cache))
    bench_proxy_cost(args.quick)


if __name__ == "__main__":
    main()

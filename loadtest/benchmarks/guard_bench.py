"""Guard chain benchmarks: the cost of authentication, rate limits and guardrails per call,
each figure a ratio against the same router without the guard, measured in the same run.

    python -m loadtest.benchmarks.guard_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import yaml

from loadtest.benchmarks.serve_bench import _h2load, generate_load, line, router_process
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from tests.redis_server import running_redis

BIG = 1_000_000_000
LIST_MODELS = "/irouter.v1.InferenceService/ListModels"


def guard_config(tmp: Path, *, redis_url: str = "", guardrails: bool = True) -> Path:
    limits = {"requests_per_minute": BIG, "tokens_per_minute": BIG, "max_concurrent_streams": 4096}
    rate = {"tiers": {"default": limits}}
    if redis_url:
        rate.update(store="redis", redis_url=redis_url)
    guard = {
        "auth": {"enabled": True, "registry": str(tmp / "registry.db")},
        "rate_limit": {"enabled": True, "config": rate},
        "guardrails": {
            "enabled": guardrails,
            "config": {
                "policies": [
                    {
                        "name": "pii",
                        "pii": {"email": "redact", "credit_card": "reject", "secret": "reject"},
                        "terms": ["forbidden", "classified", "top secret"],
                    }
                ]
            },
        },
    }
    path = tmp / f"guard-{bool(redis_url)}-{guardrails}.yaml"
    path.write_text(yaml.safe_dump({"guard": guard}))
    return path


def create_key(db: Path) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "router",
            "keys",
            "--db",
            str(db),
            "create",
            "--tenant",
            "bench",
            "--scopes",
            "inference:generate,inference:embed",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(row.split()[-1] for row in out.splitlines() if row.startswith("api key:"))


def check_accepted(target: str, key: str) -> None:
    """h2load counts any HTTP 200 as success, even a gRPC error: prove the key works first."""
    with grpc.insecure_channel(target) as channel:
        pb_grpc.InferenceServiceStub(channel).ListModels(
            pb.ListModelsRequest(), metadata=[("x-api-key", key)], timeout=10
        )


def bench_unary(tmp: Path, key: str, quick: bool) -> None:
    requests = 20_000 if quick else 60_000
    body = tmp / "empty.bin"
    body.write_bytes(struct.pack(">BI", 0, 0))
    with router_process(cpus="0") as target:
        bare = _h2load(f"http://{target}{LIST_MODELS}", body, requests)
    line("ListModels, no guard (1 core)", bare, "req/s")
    with router_process(cpus="0", config=guard_config(tmp)) as target:
        check_accepted(target, key)
        full = _h2load(f"http://{target}{LIST_MODELS}", body, requests, (f"x-api-key: {key}",))
    line(
        "ListModels, API key + in-process limiter + guardrails", full, "req/s", bare, "goal >= 0.85"
    )
    with running_redis(tmp / "redis") as redis:
        config = guard_config(tmp, redis_url=redis.url)
        with router_process(cpus="0", config=config) as target:
            check_accepted(target, key)
            rate = _h2load(f"http://{target}{LIST_MODELS}", body, requests, (f"x-api-key: {key}",))
    line("ListModels, API key + Redis limiter + guardrails", rate, "req/s", bare, "goal >= 0.7")


async def _stream_rate(target: str, key: str, n: int) -> float:
    rate, _ = await generate_load(target, 4, n, 1, metadata=(("x-api-key", key),))
    return rate


def bench_stream(tmp: Path, key: str, quick: bool) -> None:
    n = 48 if quick else 128
    with router_process(config=guard_config(tmp, guardrails=False)) as target:
        off = asyncio.run(_stream_rate(target, key, n))
    line("Generate 4 streams, output guardrails off", off, "tok/s")
    with router_process(config=guard_config(tmp)) as target:
        on = asyncio.run(_stream_rate(target, key, n))
    line("Generate 4 streams, output guardrails on", on, "tok/s", off, "goal >= 0.95")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        key = create_key(tmp / "registry.db")
        if shutil.which("h2load") and shutil.which("taskset"):
            bench_unary(tmp, key, args.quick)
        else:
            print("guard unary: skipped (h2load from Debian's nghttp2-client, or taskset, missing)")
        bench_stream(tmp, key, args.quick)


if __name__ == "__main__":
    main()

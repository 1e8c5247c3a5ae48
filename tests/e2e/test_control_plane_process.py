"""The control plane's scenario against real `irouter serve` processes, driven by the `irouter`
CLI as an administrator would, on SQLite and on PostgreSQL: register two versions, deploy one,
call it over gRPC and the OpenAI route, scale it to 2 and back, roll it out to version 2 with
traffic flowing, read the usage, restart the router (everything comes back), then undeploy and
delete the versions."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from loadtest.processes import free_port, wait_serving
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, RouterProcess
from tests.postgres_server import postgres_path, running_postgres

GEN = "smollm2-135m-instruct"


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    if postgres_path() is None:
        pytest.skip("needs PostgreSQL's initdb and postgres ($PG_BIN or Debian's package)")
    with running_postgres(tmp_path / "postgres") as server:
        yield server.create_database("registry").replace("+psycopg", "")  # the documented form


def start(model_cache: Path, config: Path, http_port: int) -> RouterProcess:
    router = RouterProcess(model_cache, "--http-port", str(http_port), config=config)
    try:
        wait_serving(router.target, timeout=180)
    except Exception:
        router.stop()
        raise
    return router


def irouter(router: RouterProcess, *argv: str, expect: int = 0) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "router", *argv, "--target", router.target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == expect, done.stdout + done.stderr
    return done.stdout if expect == 0 else done.stderr


def generate(router: RouterProcess) -> str:
    with grpc.insecure_channel(router.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.CompleteRequest(
            model="chat",
            prompt="Name a colour:",
            sampling=pb.SamplingParams(max_tokens=4, temperature=0.0),
            cache_mode=pb.CACHE_MODE_BYPASS,
        )
        return stub.Complete(request, timeout=60).text


def status(router: RouterProcess) -> dict:  # type: ignore[type-arg]
    return json.loads(irouter(router, "deployments", "status", "chat", "--json"))["deployment"]


def test_an_administrator_runs_the_control_plane(
    model_cache: Path, tmp_path: Path, registry_url: str
) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(
        "models:\n  - {name: all-minilm-l6-v2, kind: embed, artifact: all-minilm-l6-v2}\n"
        f"retrieval: {{enabled: false}}\nregistry: {{url: '{registry_url}'}}\n"
    )
    http_port = free_port()
    router = start(model_cache, config, http_port)
    try:
        irouter(router, "models", "register", "smol", "1", "--kind", "generate",
                "--package", GEN, "--input-price", "0.5", "--output-price", "1.5")  # fmt: skip
        irouter(router, "models", "register", "smol", "2", "--kind", "generate",
                "--path", str(model_cache / GEN), "--tags", "rollout")  # fmt: skip
        out = irouter(router, "deployments", "create", "chat", "--model", "smol", "--version",
                      "1", "--threads", "1", "--max-slots", "2", "--max-context", "256",
                      "--prefix-cache-mb", "0")  # fmt: skip
        assert "chat" in out and "yes" in out
        text = generate(router)
        chat = httpx.post(
            f"http://127.0.0.1:{http_port}/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 4},
            timeout=60,
        )  # fmt: skip
        assert chat.status_code == 200 and chat.json()["model"] == "chat", chat.text

        irouter(router, "deployments", "scale", "chat", "2")
        assert [r.get("ready") for r in status(router)["replica_states"]] == [True, True]
        irouter(router, "deployments", "scale", "chat", "1")
        assert len(status(router)["replica_states"]) == 1

        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                assert generate(router) == text  # greedy: the same on both versions

        caller = threading.Thread(target=traffic)
        caller.start()
        try:
            steps = ("--steps", "50,100", "--step-interval", "2", "--min-calls", "1")
            irouter(router, "deployments", "rollout", "chat", "2", *steps)
            deadline = time.monotonic() + 120
            while status(router).get("rollout", {}).get("state") == "ROLLOUT_STATE_RUNNING":
                assert time.monotonic() < deadline, "the rollout did not end"
                time.sleep(0.5)
        finally:
            stop.set()
            caller.join()
        after = status(router)
        assert after["rollout"]["state"] == "ROLLOUT_STATE_COMPLETED", after["rollout"]
        assert after["model_version"] == "2"

        usage = json.loads(irouter(router, "usage", "--group-by", "deployment,version", "--json"))
        billed = {(r["deployment"], r.get("version", "")): r for r in usage["rows"]}
        assert int(billed["chat", "1"]["calls"]) >= 1 and float(billed["chat", "1"]["cost"]) > 0
    finally:
        router.stop()

    # A restarted router serves what the registry holds, as it was.
    router = start(model_cache, config, free_port())
    try:
        assert generate(router) == text
        assert status(router)["model_version"] == "2"
        refused = irouter(router, "models", "delete", "smol", "2", expect=1)
        assert "in use by deployment(s) ['chat']" in refused
        irouter(router, "deployments", "delete", "chat")
        irouter(router, "models", "delete", "smol", "2")
        irouter(router, "models", "delete", "smol", "1")
        assert "(none)" in irouter(router, "deployments", "list")
    finally:
        router.stop()

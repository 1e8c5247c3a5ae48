"""`irouter serve` as a process: SIGHUP re-reads the config file and applies its routing
section (a canary's weight, aliases, tasks) without a restart; a reload that would need one is
refused in the log and the running routing kept."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc

from loadtest.processes import wait_serving
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import RouterProcess

CONFIG = """
retrieval: {{enabled: false}}
models:
  - {{name: smollm2-135m-instruct, kind: generate, artifact: smollm2-135m-instruct,
     max_slots: 2, max_context: 512}}
routing:
  deployments:
    - name: stable
      model: smollm2-135m-instruct
      replicas: [{{name: a}}]
    - name: canary
      model: smollm2-135m-instruct
      replicas: [{{name: a}}{extra}]
  aliases: {{chat: {{stable: {stable}, canary: {canary}}}}}
"""


def targets(stub: pb_grpc.InferenceServiceStub) -> dict[str, float]:
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models}
    return {t.deployment: t.weight for t in listed["chat"].alias_targets}


def wait_for(what: str, check: object, router: RouterProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen:\n{router.output()[-3000:]}")


def test_sighup_reloads_the_routing_section(model_cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(CONFIG.format(stable=95, canary=5, extra=""))
    router = RouterProcess(model_cache, "--no-prepare", config=path)
    try:
        wait_serving(router.target)
        with grpc.insecure_channel(router.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            assert targets(stub) == {"stable": 95.0, "canary": 5.0}
            path.write_text(CONFIG.format(stable=50, canary=50, extra=""))
            os.kill(router.proc.pid, signal.SIGHUP)
            wait_for(
                "the reload", lambda: targets(stub) == {"stable": 50.0, "canary": 50.0}, router
            )
            assert "SIGHUP: routing reloaded: aliases" in router.output()
            # Adding a replica builds an engine: refused until a restart, routing kept.
            path.write_text(CONFIG.format(stable=10, canary=90, extra=", {name: b}"))
            os.kill(router.proc.pid, signal.SIGHUP)
            wait_for("the refusal", lambda: "need a restart" in router.output(), router)
            assert targets(stub) == {"stable": 50.0, "canary": 50.0}
            answer = stub.Complete(
                pb.CompleteRequest(
                    model="chat",
                    prompt="Hello",
                    sampling=pb.SamplingParams(max_tokens=2, temperature=0.0),
                ),
                timeout=60,
            )
            assert answer.model in ("stable", "canary")
    finally:
        router.stop()

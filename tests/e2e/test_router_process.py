"""`irouter serve` as a real process, driven by the example clients in Python and Node."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.processes import wait_serving
from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, RouterProcess

QUESTION = "What is the capital of France?"


def test_python_example_streams_an_answer(router_process: RouterProcess) -> None:
    done = subprocess.run(
        [sys.executable, "examples/python_client.py", "--target", router_process.target, QUESTION],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Paris" in done.stdout
    assert "[FINISH_REASON_" in done.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_example_streams_an_answer(router_process: RouterProcess) -> None:
    if not (ROOT / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("node_modules is missing: run `make install` (npm install) first")
    done = subprocess.run(
        ["node", "examples/node_client.js", router_process.target, QUESTION, "24"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Paris" in done.stdout
    assert "FINISH_REASON_" in done.stdout


def metric_samples(router: RouterProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    url = f"http://127.0.0.1:{router.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_calls_and_tokens(router_process: RouterProcess) -> None:
    before = metric_samples(router_process)  # other tests share this router
    with grpc.insecure_channel(router_process.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stub.Complete(
            pb.CompleteRequest(
                model="smollm2-135m-instruct",
                prompt="Hi",
                sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True),
                cache_mode=pb.CACHE_MODE_BYPASS,
            )
        )
    after = metric_samples(router_process)

    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, f"no sample {key}"
        return after[key] - before.get(key, 0.0)

    gen = {"model": "smollm2-135m-instruct"}
    assert added("irouter_requests_total", code="OK", method="InferenceService/Complete") == 1
    assert added("irouter_request_seconds_count", method="InferenceService/Complete") == 1
    assert added("irouter_completion_tokens_total", **gen) == 4
    assert added("irouter_prompt_tokens_total", **gen) >= 1
    assert added("irouter_time_to_first_token_seconds_count", **gen) == 1
    assert added("irouter_inter_token_seconds_count", **gen) == 3  # between 4 tokens
    assert added("irouter_batch_size_count", **gen) >= 1  # engine steps
    # Idle again: the gauges say so (not the last step's values).
    assert after[("irouter_kv_slots_in_use", (("model", gen["model"]),))] == 0
    assert after[("irouter_queue_depth", (("model", gen["model"]),))] == 0


def test_sigterm_lets_in_flight_streams_finish(model_cache: Path) -> None:
    router = RouterProcess(model_cache)
    try:
        wait_serving(router.target)
        with grpc.insecure_channel(router.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            stream = stub.Generate(
                pb.GenerateRequest(
                    model="smollm2-135m-instruct",
                    prompt="Count from one to one hundred:",
                    sampling=pb.SamplingParams(max_tokens=120, temperature=0, ignore_eos=True),
                )
            )
            first = next(stream)
            router.proc.send_signal(signal.SIGTERM)
            rest = list(stream)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert rest[-1].usage.completion_tokens == 120
            assert first.text or rest
        assert router.proc.wait(timeout=30) == 0, router.output()
        # Shut down cleanly: no native object left for nanobind to report at teardown.
        assert "leaked" not in router.output(), router.output()
    finally:
        router.stop()


def test_workers_share_one_port(model_cache: Path) -> None:
    router = RouterProcess(model_cache, "--workers", "2")
    try:
        wait_serving(router.target)
        pids: set[str] = set()
        # Until a deadline, not a count of calls: on a fast CPU 40 one-token calls ended before
        # the second worker had bound the port, and every connection went to the first.
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            # a new channel is a new connection, which SO_REUSEPORT may give to either worker
            with grpc.insecure_channel(
                router.target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as ch:
                stub = pb_grpc.InferenceServiceStub(ch)
                try:
                    r = stub.Complete(
                        pb.CompleteRequest(
                            model="smollm2-135m-instruct",
                            prompt="Hi",
                            sampling=pb.SamplingParams(max_tokens=1),
                        ),
                        timeout=60,
                    )
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.UNAVAILABLE:  # that worker still loading
                        continue
                    raise
                pids.add(r.id.split("-")[1])
        assert len(pids) == 2, pids
    finally:
        router.stop()


def test_openai_sdk_through_the_proxy_process(router_process: RouterProcess) -> None:
    import openai

    from loadtest.processes import free_port

    port = free_port()
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router",
            "proxy",
            "--port",
            str(port),
            "--target",
            router_process.target,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        deadline = time.monotonic() + 30
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert "smollm2-135m-instruct" in {m.id for m in models.data}
        answer = client.chat.completions.create(
            model="smollm2-135m-instruct",
            temperature=0,
            max_tokens=24,
            messages=[{"role": "user", "content": QUESTION}],
        )
        assert "Paris" in (answer.choices[0].message.content or "")
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def test_a_port_in_use_is_a_clear_error_not_a_traceback(model_cache: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
        done = subprocess.run(
            [sys.executable, "-m", "router", *serve, "--no-prepare"],
            cwd=ROOT,
            env={**os.environ, "IROUTER_MODEL_CACHE": str(model_cache)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"irouter: cannot bind 127.0.0.1:{port}: in use" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "leaked" not in done.stderr, done.stderr[-2000:]

"""`irouter serve --http-port`: one process serving gRPC and the REST proxy."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from loadtest.processes import free_port, wait_serving
from tests.e2e.conftest import RouterProcess

GEN = "smollm2-135m-instruct"


def wait_http(url: str, router: RouterProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.TransportError:
            assert router.proc.poll() is None, router.output()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_serve_with_http_port_answers_both_route_families(model_cache: Path) -> None:
    http_port = free_port()
    router = RouterProcess(model_cache, "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_serving(router.target)
        wait_http(f"{base}/openapi.json", router)
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post(
                f"/v1beta/models/{GEN}:complete",
                json={"prompt": "The capital of France is", "sampling": {"maxTokens": 4}},
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completionTokens"] >= 1
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": GEN,
                    "temperature": 0,
                    "max_tokens": 24,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                },
            )
            assert r.status_code == 200, r.text
            assert "Paris" in r.json()["choices"][0]["message"]["content"]
            assert http.get("/docs").status_code == 200
        router.proc.terminate()
        assert router.proc.wait(timeout=30) == 0, router.output()
    finally:
        router.stop()


def test_http_port_with_workers_is_refused(model_cache: Path) -> None:
    router = RouterProcess(
        model_cache, "--http-port", str(free_port()), "--workers", "2", "--no-prepare"
    )
    try:
        assert router.proc.wait(timeout=60) == 2
        assert "--http-port serves from one process" in router.output()
    finally:
        router.stop()

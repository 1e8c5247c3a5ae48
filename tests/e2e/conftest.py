from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.processes import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[2]


class RouterProcess:
    def __init__(self, model_cache: Path, *args: str, config: Path | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        env = dict(os.environ, IROUTER_MODEL_CACHE=str(model_cache))
        cmd = [
            sys.executable,
            "-m",
            "router",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            *args,
        ]
        if config is not None:
            cmd += ["--config", str(config)]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        """What the router printed so far (for assertion messages)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def router_process(model_cache: Path) -> Iterator[RouterProcess]:
    router = RouterProcess(model_cache)
    try:
        wait_serving(router.target)
        yield router
    finally:
        router.stop()

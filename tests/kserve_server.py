"""A real KServe v2 gRPC server for tests and benchmarks: KServe's own ModelServer (the `kserve`
package, from build/kserve-venv) serving tests/kserve_model.py's llama.cpp text model, in its own
process on free ports, stopped at the end:

    with running_kserve_server(gguf) as server:
        engine = KServeEngine(KServeConfig(url=server.target, model=server.model))

Tests that need it skip when build/kserve-venv is missing (`kserve_missing()` gives the reason).
KServe binds its ports on every interface ([::] and 0.0.0.0); clients use 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from backends.kserve import grpc_predict_v2_pb2 as pb
from backends.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.openai_servers import free_port

ROOT = Path(__file__).resolve().parent.parent
KSERVE_PYTHON = ROOT / "build" / "kserve-venv" / "bin" / "python"
MODEL_SCRIPT = Path(__file__).resolve().parent / "kserve_model.py"
_START_TIMEOUT_S = 120.0
_PORT_ATTEMPTS = 3


def kserve_missing() -> str | None:
    """Why KServe's ModelServer cannot run here, or None."""
    if not KSERVE_PYTHON.exists():
        return f"{KSERVE_PYTHON.parent.parent} is missing (make install creates it)"
    return None


class KServeServer:
    """`kserve_model.py` under KServe's ModelServer: gRPC (the v2 protocol) and REST ports."""

    def __init__(self, gguf: Path, *, model: str = "smollm2", threads: int = 1) -> None:
        self.gguf = gguf
        self.model = model
        """The model name it serves."""
        self.threads = threads
        self.grpc_port = 0
        self.http_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())

    @property
    def target(self) -> str:
        """The gRPC endpoint, 'host:port'."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def output(self) -> str:
        """What the server printed so far (for failure messages)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-6000:]

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, all threads (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server for the block: it keeps its sockets but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def start(self) -> KServeServer:
        """Start on free ports (retried if another process takes one first) and wait until
        ServerReady and ModelReady answer true over gRPC."""
        for _ in range(_PORT_ATTEMPTS):
            self.grpc_port, self.http_port = free_port(), free_port()
            if self._launch():
                return self
        raise RuntimeError(f"the KServe server did not start on {self.target}:\n{self.output()}")

    def _launch(self) -> bool:
        cmd = [str(KSERVE_PYTHON), str(MODEL_SCRIPT), "--gguf", str(self.gguf)]
        cmd += ["--model_name", self.model, "--threads", str(self.threads)]
        cmd += ["--grpc_port", str(self.grpc_port), "--http_port", str(self.http_port)]
        # KServe's REST server starts too (it cannot be turned off); it is not used.
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _START_TIMEOUT_S
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False  # exited: most likely a port was taken
                with contextlib.suppress(grpc.RpcError):
                    if stub.ModelReady(pb.ModelReadyRequest(name=self.model), timeout=2).ready:
                        return True
                time.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate the server and wait for it (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # in case a test left it paused
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()


@contextlib.contextmanager
def running_kserve_server(
    gguf: Path, *, model: str = "smollm2", threads: int = 1
) -> Iterator[KServeServer]:
    """KServe's ModelServer with the llama.cpp text model on `gguf` (one request at a time)."""
    server = KServeServer(gguf, model=model, threads=threads)
    try:
        yield server.start()
    finally:
        server.close()

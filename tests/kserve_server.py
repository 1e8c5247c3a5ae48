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
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from backends.kserve import grpc_predict_v2_pb2 as pb
from backends.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from loadtest.processes import free_port
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
KSERVE_PYTHON = ROOT / "build" / "kserve-venv" / "bin" / "python"
MODEL_SCRIPT = Path(__file__).resolve().parent / "kserve_model.py"


def kserve_missing() -> str | None:
    """Why KServe's ModelServer cannot run here, or None."""
    if not KSERVE_PYTHON.exists():
        return f"{KSERVE_PYTHON.parent.parent} is missing (make install creates it)"
    return None


class KServeServer(ServerProcess):
    """`kserve_model.py` under KServe's ModelServer: gRPC (the v2 protocol, on `port`) and REST
    ports."""

    start_timeout_s = 120.0
    probe_interval_s = 0.2
    stop_timeout_s = 15.0
    port_attempts = 3
    output_chars = 6000

    def __init__(self, gguf: Path, *, model: str = "smollm2", threads: int = 1) -> None:
        super().__init__("the KServe server")
        self.gguf = gguf
        self.model = model
        """The model name it serves."""
        self.threads = threads
        self.http_port = 0

    @property
    def grpc_port(self) -> int:
        return self.port

    @property
    def target(self) -> str:
        """The gRPC endpoint, 'host:port'."""
        return self.address

    def _choose_ports(self) -> None:
        self.port, self.http_port = free_port(), free_port()

    def _command(self) -> list[str]:
        cmd = [str(KSERVE_PYTHON), str(MODEL_SCRIPT), "--gguf", str(self.gguf)]
        cmd += ["--model_name", self.model, "--threads", str(self.threads)]
        # KServe's REST server starts too (it cannot be turned off); it is not used.
        return [*cmd, "--grpc_port", str(self.port), "--http_port", str(self.http_port)]

    @contextlib.contextmanager
    def _readiness(self) -> Iterator[Callable[[], bool]]:
        """ModelReady answers true over gRPC."""
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def ready() -> bool:
                with contextlib.suppress(grpc.RpcError):
                    return stub.ModelReady(pb.ModelReadyRequest(name=self.model), timeout=2).ready
                return False

            yield ready


@contextlib.contextmanager
def running_kserve_server(
    gguf: Path, *, model: str = "smollm2", threads: int = 1
) -> Iterator[KServeServer]:
    """KServe's ModelServer with the llama.cpp text model on `gguf` (one request at a time)."""
    with KServeServer(gguf, model=model, threads=threads).started() as server:
        yield server

"""One server process on free loopback ports, for tests and benchmarks: the lifecycle that
tests/openai_servers.py, tests/kserve_server.py and tests/redis_server.py share.

A subclass says only what differs: which ports to take (`_choose_ports`), the command line
(`_command`) and how to ask once whether the server answers (`_readiness`), plus its timings as
class attributes. `ServerProcess` does the rest:

- `start()`: choose ports, launch, probe every `probe_interval_s` until it answers; if the process
  exits first (most likely another process took a port between choosing and binding it), choose
  again, `port_attempts` times; give up after `start_timeout_s` per attempt.
- `stop()` (SIGCONT in case it is paused, SIGTERM, then SIGKILL after `stop_timeout_s`),
  `kill()` (a crash), `pause()`/`resume()`/`paused()` (SIGSTOP/SIGCONT: a hung server that still
  accepts connections), `restart()` (again on the same ports), `close()` (stop, then drop the
  output), `started()` (a context: started in the block, closed after it).
- `output()` (what it printed, for failure messages), `cpu_seconds()`, `pid`, `alive`.
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, ClassVar, Self


class ServerProcess(abc.ABC):
    """A server subprocess on 127.0.0.1: `port` is the one it answers on."""

    start_timeout_s: ClassVar[float] = 120.0
    """How long one launch may take to answer."""
    probe_interval_s: ClassVar[float] = 0.1
    """The pause between two readiness probes."""
    stop_timeout_s: ClassVar[float] = 10.0
    """How long stop() waits after SIGTERM before SIGKILL."""
    port_attempts: ClassVar[int] = 3
    """How many times start() chooses ports and launches before it gives up."""
    captures_output: ClassVar[bool] = True
    """Whether stdout and stderr go to a temp file that output() reads (else to /dev/null)."""
    output_chars: ClassVar[int] = 4000
    """How much of the end of the output output() returns."""

    def __init__(self, label: str) -> None:
        self.label = label
        """What the server is called in error messages."""
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        if self.captures_output:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())

    # ---- what differs ----------------------------------------------------------------------

    @abc.abstractmethod
    def _choose_ports(self) -> None:
        """Set `port` (and any other port the server binds) for the next launch."""

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The command line that serves on the chosen ports."""

    @abc.abstractmethod
    def _readiness(self) -> contextlib.AbstractContextManager[Callable[[], bool]]:
        """A context (a client, a channel) giving a probe: one call, True once it answers."""

    # ---- what does not ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        """'127.0.0.1:port'."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id, or None when none was launched or it was stopped or killed."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Whether the process is running (a paused one is)."""
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """What the server printed so far (for failure messages)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-self.output_chars :]

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far, all threads (Linux /proc)."""
        fields = Path(f"/proc/{self._running().pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> Self:
        """Start on free ports (chosen again if another process takes one first) and wait
        until the server answers."""
        for _ in range(self.port_attempts):
            self._choose_ports()
            if self._launch():
                return self
        raise RuntimeError(f"{self.label} did not start on {self.address}:\n{self.output()}")

    def restart(self) -> Self:
        """Start again on the same ports (after kill() or stop()) and wait until it answers."""
        self.stop()
        if not self._launch():
            raise RuntimeError(f"{self.label} did not restart on {self.address}:\n{self.output()}")
        return self

    def _launch(self) -> bool:
        stdout = subprocess.DEVNULL if self._log is None else self._log
        proc = subprocess.Popen(self._command(), stdout=stdout, stderr=subprocess.STDOUT)
        self._proc = proc
        deadline = time.monotonic() + self.start_timeout_s
        with self._readiness() as ready:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False  # exited: most likely a port was taken
                if ready():
                    return True
                time.sleep(self.probe_interval_s)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate the server and wait for it (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case a test left it paused
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """stop(), then drop the captured output."""
        self.stop()
        if self._log is not None:
            self._log.close()

    @contextlib.contextmanager
    def started(self) -> Iterator[Self]:
        """start() for the block, close() after it."""
        try:
            yield self.start()
        finally:
            self.close()

    # ---- faults, for tests that break the server on purpose --------------------------------

    def kill(self) -> None:
        """A crash: SIGKILL, no clean shutdown, open connections reset (then reaped)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """A hang: SIGSTOP. The kernel still accepts connections, nothing answers."""
        self._running().send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause() (harmless when not paused)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """pause() for the block, resume() after it."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def _running(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, f"{self.label} is not running"
        return self._proc

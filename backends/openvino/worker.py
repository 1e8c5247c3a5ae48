"""OpenVINO GenAI's continuous-batching pipeline in a process of its own, stepped there; the
router's side (pipeline.py) sends it requests and cancellations and receives each step's tokens
over two pipes.

Why a process: `ContinuousBatchingPipeline.step()` holds the GIL for the whole step (measured
with the wheel installed here: a thread ticking every millisecond ran once during a 480 ms
step). In the router's process the event loop, and so every other call, stopped for each step:
ListModels p99 795 ms (max 2 s) while 16 streams ran on OpenVINO, against 10 ms while they ran
on ONNX Runtime, whose native scheduler releases the GIL (AMD EPYC, 2 cores).

Messages to the worker: `Add` (a request), an int (cancel that key), None (stop). From it: one
("ready", "") or ("failed", why) after loading; then ("step", outputs, batch, waiting, running,
seconds) after every step, outputs being (key, token ids, finish reason or None, error or "");
("idle",) when it has nothing left to step.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from backends.base import gather_burst
from backends.openvino.ir import load_pipeline

_FINISHED = {
    ov_genai.GenerationStatus.FINISHED,
    ov_genai.GenerationStatus.STOP,
    ov_genai.GenerationStatus.CANCEL,
    ov_genai.GenerationStatus.IGNORED,
}

Output = tuple[int, tuple[int, ...], str | None, str]


@dataclass(frozen=True)
class Setup:
    """What the worker builds its pipeline from (picklable)."""

    model_dir: str
    gguf_path: str | None
    exact: bool
    device: str
    properties: dict[str, Any]
    scheduler: dict[str, Any]
    """SchedulerConfig's fields."""


@dataclass(frozen=True)
class Add:
    key: int
    ids: tuple[int, ...]
    config: dict[str, Any]
    """GenerationConfig's fields (build_config)."""
    watch: frozenset[int]
    """Stop tokens the worker must enforce: GenAI ignores stop_token_ids under ignore_eos."""


def build_config(fields: dict[str, Any]) -> ov_genai.GenerationConfig:
    """A GenerationConfig from its fields; ValueError when GenAI refuses them."""
    config = ov_genai.GenerationConfig()
    eos = fields.pop("eos_token_id")
    for name, value in fields.items():
        setattr(config, name, value)
    config.set_eos_token_id(eos)
    try:
        config.validate()
    except RuntimeError as exc:
        raise ValueError(f"OpenVINO GenAI refused the sampling parameters: {exc}") from None
    return config


def main(setup: Setup, inbox: Connection, outbox: Connection) -> None:
    """The worker process: load, then step until told to stop or the router goes away. The
    terminal's Ctrl-C and a service manager's SIGTERM reach the whole process group: the router
    drains its calls first, then stops this worker (None, or its end of the pipe closing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        scheduler = ov_genai.SchedulerConfig()
        for name, value in setup.scheduler.items():
            setattr(scheduler, name, value)
        pipe = load_pipeline(
            Path(setup.model_dir),
            Path(setup.gguf_path) if setup.gguf_path else None,
            exact=setup.exact,
            scheduler=scheduler,
            device=setup.device,
            properties=setup.properties,
        )
    except Exception as exc:  # whatever the load raises goes back to the router, named
        outbox.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    outbox.send(("ready", ""))
    with contextlib.suppress(EOFError, OSError):  # the router's end closed: nothing to serve
        _Stepper(pipe, inbox, outbox).run()


class _Stepper:
    def __init__(self, pipe: Any, inbox: Connection, outbox: Connection) -> None:
        self._pipe = pipe
        self._inbox = inbox
        self._outbox = outbox
        self._handles: dict[int, tuple[Any, frozenset[int]]] = {}
        self._stopping = False

    def run(self) -> None:
        while not self._stopping:
            out: list[Output] = []
            while self._inbox.poll(0) and not self._stopping:
                self._take(self._inbox.recv(), out)
            if self._stopping:
                break
            if not self._handles and not self._pipe.has_non_finished_requests():
                if out:
                    self._outbox.send(("step", out, 0, 0, 0, 0.0))
                self._outbox.send(("idle",))
                self._take(self._inbox.recv(), out)  # blocks until there is work
                self._gather_burst(out)
                if out:  # refused before any step: answered now, not dropped
                    self._outbox.send(("step", out, 0, 0, 0, 0.0))
                continue
            started = time.perf_counter()
            batch = len(self._handles)
            try:
                self._pipe.step()
                self._read(out)
            except Exception as exc:  # a failing step fails what is running; the rest serves
                for key, (handle, _) in list(self._handles.items()):
                    handle.cancel()
                    out.append((key, (), None, f"the OpenVINO GenAI step failed: {exc}"))
                self._handles.clear()
            metrics = self._pipe.get_metrics()
            running = int(metrics.scheduled_requests)
            waiting = max(0, int(metrics.requests) - running)
            seconds = time.perf_counter() - started
            self._outbox.send(("step", out, batch, waiting, running, seconds))
        for handle, _ in self._handles.values():
            handle.cancel()

    def _gather_burst(self, out: list[Output]) -> None:
        def arrived(timeout: float) -> bool:
            if not self._inbox.poll(timeout):
                return False
            self._take(self._inbox.recv(), out)
            return True

        gather_burst(arrived)

    def _take(self, message: Add | int | None, out: list[Output]) -> None:
        if message is None:
            self._stopping = True
        elif isinstance(message, int):
            entry = self._handles.pop(message, None)
            if entry is not None:
                entry[0].cancel()  # its blocks are freed at the next step
        else:
            try:
                ids = ov.Tensor(np.asarray([message.ids], dtype=np.int64))
                handle = self._pipe.add_request(message.key, ids, build_config(message.config))
            except Exception as exc:
                out.append((message.key, (), None, f"OpenVINO GenAI refused it: {exc}"))
                return
            self._handles[message.key] = (handle, message.watch)

    def _read(self, out: list[Output]) -> None:
        for key, (handle, watch) in list(self._handles.items()):
            tokens: list[int] = []
            reason = None
            while handle.can_read():
                for output in handle.read().values():
                    tokens.extend(output.generated_ids)
                    if output.finish_reason == ov_genai.GenerationFinishReason.LENGTH:
                        reason = "length"
                    elif output.finish_reason == ov_genai.GenerationFinishReason.STOP:
                        reason = "stop"
            status = handle.get_status()
            if status == ov_genai.GenerationStatus.IGNORED:
                del self._handles[key]
                why = "OpenVINO GenAI ignored the request (KV cache too small)"
                out.append((key, (), None, why))
                continue
            hit = next((i for i, t in enumerate(tokens) if t in watch), -1) if watch else -1
            if hit >= 0:
                del tokens[hit + 1 :]
                reason = "stop"
                handle.cancel()  # its blocks are freed at the next step
            elif status in _FINISHED and reason is None:
                reason = "stop"  # finished without a reason on its outputs: treat as an end
            if reason is not None:
                del self._handles[key]
            if tokens or reason is not None:
                out.append((key, tuple(tokens), reason, ""))

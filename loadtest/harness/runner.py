"""Runs a scenario's stages one after the other and returns their records.

A stage's load is split evenly between `processes` client processes (multiprocessing, spawn),
each with its own event loop and connections, because one Python process tops out near 3,000
unary calls/s. Every process connects first and reports ready; the parent then publishes one
start instant on `time.perf_counter()`'s clock (CLOCK_MONOTONIC, shared by every process on the
machine), so all records share one time base and merge by concatenation. Split Poisson streams
stay Poisson: k independent arrivals at rate r/k add up to arrivals at rate r. With one process
the stage runs in the caller's event loop (an in-process router keeps serving meanwhile)."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import queue
import random
import time
from dataclasses import dataclass
from typing import Any

from loadtest.harness.progress import ProgressView
from loadtest.harness.prompts import Prompt, load_prompts
from loadtest.harness.record import RequestRecord, records_from_columns, records_to_columns
from loadtest.harness.scenario import Scenario, Stage, scenario_from_dict
from loadtest.harness.targets import Call, Target, create_target

logger = logging.getLogger(__name__)

_REPORT_EVERY_S = 0.2
_START_DELAY_S = 0.05


async def _sleep_until(instant: float) -> None:
    """Sleep until time.perf_counter() >= instant. uvloop's timers have millisecond resolution
    and may fire up to a millisecond early, which would date a send before its due time (and
    before the stage's start)."""
    while (delay := instant - time.perf_counter()) > 0:
        await asyncio.sleep(delay)


class HarnessError(RuntimeError):
    """The harness itself failed (a client process could not connect or died)."""


@dataclass(frozen=True)
class Share:
    """One client process's part of a stage."""

    index: int
    """Process number (seeds its random choices)."""
    concurrency: int | None
    """Closed loop: requests it keeps in flight."""
    rate: float | None
    """Open loop: its Poisson arrival rate."""
    max_concurrency: int | None
    """Open loop: its cap on requests in flight."""
    requests: int | None
    """Requests it issues at most."""

    @property
    def in_flight_hint(self) -> int:
        return self.concurrency or self.max_concurrency or 256


def _split_int(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def split_stage(scenario: Scenario, stage: Stage) -> list[Share]:
    """Even shares; never more processes than requests in flight in a closed loop."""
    n = scenario.processes
    if stage.concurrency is not None:
        n = min(n, stage.concurrency)
    if scenario.requests is not None:
        n = min(n, scenario.requests)
    conc = _split_int(stage.concurrency, n) if stage.concurrency is not None else [None] * n
    reqs = _split_int(scenario.requests, n) if scenario.requests is not None else [None] * n
    cap = None if stage.max_concurrency is None else math.ceil(stage.max_concurrency / n)
    rate = None if stage.rate is None else stage.rate / n
    return [Share(i, conc[i], rate, cap, reqs[i]) for i in range(n)]


class Tally:
    """Counts a process's answers for the progress bar."""

    def __init__(self) -> None:
        self.done = 0
        self.errors = 0


async def drive(
    scenario: Scenario,
    share: Share,
    target: Target,
    prompts: list[Prompt],
    t0: float,
    tally: Tally,
) -> list[RequestRecord]:
    """Issue one process's share of a stage starting at `t0`; records come back relative to t0."""
    rng = random.Random(scenario.seed * 1_000_003 + share.index)
    methods = [m for m, _ in scenario.mix]
    weights = [w for _, w in scenario.mix]
    deadline = t0 + scenario.duration_s if scenario.duration_s is not None else math.inf
    budget = share.requests if share.requests is not None else math.inf
    issued = 0
    records: list[RequestRecord] = []

    def next_call() -> Call:
        method = rng.choices(methods, weights)[0] if len(methods) > 1 else methods[0]
        return Call(method, rng.choice(prompts), scenario.max_tokens.sample(rng))

    async def send(call: Call, lag: float) -> RequestRecord:
        record = await target.call(call)
        record.lag = lag
        record.process = share.index
        records.append(record.shifted(t0))
        tally.done += 1
        tally.errors += not record.ok
        return record

    await _sleep_until(t0)
    if share.concurrency is not None:

        async def closed_loop() -> None:
            nonlocal issued
            while issued < budget and time.perf_counter() < deadline:
                issued += 1
                record = await send(next_call(), 0.0)
                if scenario.honor_retry_info and record.retry_after:
                    await asyncio.sleep(
                        min(record.retry_after, max(deadline - time.perf_counter(), 0.0))
                    )

        await asyncio.gather(*(closed_loop() for _ in range(share.concurrency)))
        return records

    assert share.rate is not None
    limit = asyncio.Semaphore(share.max_concurrency) if share.max_concurrency else None

    async def arrival(call: Call, due: float) -> None:
        if limit is None:
            await send(call, time.perf_counter() - due)
            return
        async with limit:
            await send(call, time.perf_counter() - due)

    tasks: list[asyncio.Task[None]] = []
    due = t0
    while issued < budget:
        due += rng.expovariate(share.rate)
        if due >= deadline:
            break
        await _sleep_until(due)
        issued += 1
        tasks.append(asyncio.create_task(arrival(next_call(), due)))
    await asyncio.gather(*tasks)
    return records


async def _report(view: ProgressView, tallies: list[Tally]) -> None:
    while True:
        view.update(sum(t.done for t in tallies), sum(t.errors for t in tallies))
        await asyncio.sleep(_REPORT_EVERY_S)


async def _run_in_process(
    scenario: Scenario, share: Share, view: ProgressView
) -> list[RequestRecord]:
    prompts = load_prompts(scenario.prompts)
    target = create_target(scenario, share.in_flight_hint)
    try:
        try:
            await target.start()
        except Exception as exc:
            raise HarnessError(f"cannot reach {scenario.target}: {exc}") from exc
        tally = Tally()
        t0 = time.perf_counter()
        view.start(t0)
        reporter = asyncio.create_task(_report(view, [tally]))
        try:
            return await drive(scenario, share, target, prompts, t0, tally)
        finally:
            reporter.cancel()
            view.update(tally.done, tally.errors)
    finally:
        await target.aclose()


# ---- client processes ---------------------------------------------------------------------------


def _worker(
    scenario_dict: dict[str, Any],
    share: Share,
    messages: Any,
    start: Any,
    t0: Any,
) -> None:
    """Entry point of a spawned client process."""
    try:
        import uvloop

        uvloop.run(_worker_main(scenario_dict, share, messages, start, t0))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_worker_main(scenario_dict, share, messages, start, t0))


async def _worker_main(
    scenario_dict: dict[str, Any], share: Share, messages: Any, start: Any, t0_value: Any
) -> None:
    scenario = scenario_from_dict(scenario_dict)
    target = create_target(scenario, share.in_flight_hint)
    try:
        prompts = load_prompts(scenario.prompts)
        await target.start()
    except Exception as exc:
        messages.put(("failed", share.index, f"{type(exc).__name__}: {exc}"))
        await target.aclose()
        return
    messages.put(("ready", share.index, None))
    await asyncio.to_thread(start.wait)
    t0 = float(t0_value.value)
    tally = Tally()

    async def report() -> None:
        while True:
            await asyncio.sleep(_REPORT_EVERY_S)
            messages.put(("progress", share.index, (tally.done, tally.errors)))

    reporter = asyncio.create_task(report())
    try:
        records = await drive(scenario, share, target, prompts, t0, tally)
    finally:
        reporter.cancel()
        await target.aclose()
    messages.put(("done", share.index, records_to_columns(records)))


async def _next_message(messages: Any, procs: list[Any]) -> tuple[str, int, Any]:
    while True:
        try:
            message: tuple[str, int, Any] = await asyncio.to_thread(messages.get, True, 0.2)
            return message
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise HarnessError(
                    f"client process {procs.index(dead[0])} exited with code {dead[0].exitcode}"
                ) from None


async def _run_in_processes(
    scenario: Scenario, shares: list[Share], view: ProgressView
) -> list[RequestRecord]:
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    start = ctx.Event()
    t0 = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_worker,
            args=(scenario.to_dict(), share, messages, start, t0),
            name=f"loadtest-client-{share.index}",
            daemon=True,
        )
        for share in shares
    ]
    for p in procs:
        p.start()
    try:
        ready = 0
        while ready < len(procs):
            kind, index, payload = await _next_message(messages, procs)
            if kind == "failed":
                raise HarnessError(
                    f"client process {index} cannot reach {scenario.target}: {payload}"
                )
            ready += kind == "ready"
        t0.value = time.perf_counter() + _START_DELAY_S
        start.set()
        view.start(t0.value)
        counts: dict[int, tuple[int, int]] = {}
        records: list[RequestRecord] = []
        finished = 0
        while finished < len(procs):
            kind, index, payload = await _next_message(messages, procs)
            if kind == "progress":
                counts[index] = payload
            elif kind == "done":
                part = records_from_columns(payload)
                records.extend(part)
                counts[index] = (len(part), sum(not r.ok for r in part))
                finished += 1
            view.update(sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
        for p in procs:
            await asyncio.to_thread(p.join, 10)
        records.sort(key=lambda r: r.start)
        return records
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)


async def run_stage(
    scenario: Scenario, stage: Stage, *, progress: bool = False
) -> list[RequestRecord]:
    """All records of one stage, merged over client processes, times relative to its start."""
    shares = split_stage(scenario, stage)
    view = ProgressView(stage.label, scenario, enabled=progress)
    try:
        if len(shares) == 1:
            return await _run_in_process(scenario, shares[0], view)
        return await _run_in_processes(scenario, shares, view)
    finally:
        view.close()

"""The live progress bar of a stage: elapsed seconds (or requests, for a request-count run),
with answers so far, the current request rate and the error count."""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from loadtest.harness.scenario import Scenario


class ProgressView:
    """A tqdm bar on stderr, or nothing when disabled."""

    def __init__(self, label: str, scenario: Scenario, *, enabled: bool) -> None:
        self._by_time = scenario.duration_s is not None
        self._total = scenario.duration_s if self._by_time else scenario.requests
        self._bar: Any = None
        self._label = label
        self._enabled = enabled
        self._t0 = 0.0
        self._last = (0.0, 0)

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._last = (t0, 0)
        if self._enabled:
            self._bar = tqdm(
                total=self._total,
                desc=self._label,
                unit="s" if self._by_time else "req",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}{unit} "
                "[{elapsed}]{postfix}",
                leave=True,
            )

    def update(self, done: int, errors: int) -> None:
        if self._bar is None:
            return
        now = time.perf_counter()
        then, before = self._last
        rate = (done - before) / (now - then) if now > then + 0.05 else 0.0
        if now > then + 0.5:
            self._last = (now, done)
        position = min(now - self._t0, self._total or 0.0) if self._by_time else done
        self._bar.n = max(0.0, position)
        self._bar.set_postfix_str(f"{done} done, {rate:,.0f} req/s, {errors} errors", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""The face every load-test target implements: a `Target` sends one `Call` and returns its
`RequestRecord`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loadtest.harness.prompts import Prompt
from loadtest.harness.record import RequestRecord


@dataclass(frozen=True, slots=True)
class Call:
    """One request to send."""

    method: str
    """Method name as in the scenario mix."""
    prompt: Prompt
    """Its input."""
    max_tokens: int
    """Its max_tokens (generation methods)."""


class Target(Protocol):
    async def start(self) -> None:
        """Open connections (before the stage's clock starts)."""

    async def call(self, call: Call) -> RequestRecord:
        """Send `call`; never raises for a failed request (the record carries the status).
        Times in the record are absolute `time.perf_counter()` values."""

    async def aclose(self) -> None:
        """Close connections."""

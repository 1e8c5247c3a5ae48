"""What a load test calls: a `Target` sends one `Call` and returns its `RequestRecord`.
`create_target` picks the gRPC or the OpenAI HTTP implementation from the scenario's target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loadtest.harness.prompts import Prompt
from loadtest.harness.record import RequestRecord
from loadtest.harness.scenario import Scenario


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


def create_target(scenario: Scenario, concurrency_hint: int) -> Target:
    """`concurrency_hint` sizes the HTTP connection pool (requests in flight in this process)."""
    if scenario.protocol == "grpc":
        from loadtest.harness.targets.grpc_target import GrpcTarget

        return GrpcTarget(scenario)
    from loadtest.harness.targets.openai_http import OpenAIHttpTarget

    return OpenAIHttpTarget(scenario, concurrency_hint)

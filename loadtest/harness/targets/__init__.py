"""What a load test calls: a `Target` sends one `Call` and returns its `RequestRecord`.
`create_target` picks the gRPC or the OpenAI HTTP implementation from the scenario's target."""

from __future__ import annotations

from loadtest.harness.scenario import Scenario
from loadtest.harness.targets.call import Call, Target

__all__ = ["Call", "Target", "create_target"]


def create_target(scenario: Scenario, concurrency_hint: int) -> Target:
    """`concurrency_hint` sizes the HTTP connection pool (requests in flight in this process)."""
    if scenario.protocol == "grpc":
        from loadtest.harness.targets.grpc_target import GrpcTarget

        return GrpcTarget(scenario)
    from loadtest.harness.targets.openai_http import OpenAIHttpTarget

    return OpenAIHttpTarget(scenario, concurrency_hint)

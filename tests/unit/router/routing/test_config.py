"""The routing section loads through the generic config loader and refuses bad values by name."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from router.config import ConfigError
from router.config_file import _build
from router.routing.config import (
    DeploymentConfig,
    ReplicaConfig,
    RetryConfig,
    RoutingConfig,
)

EXAMPLE = """
deployments:
  - name: llama-gpu
    model: llama-3.2-1b
    balancer: affinity
    replicas:
      - {name: gpu0, device: "cuda:0", weight: 2}
      - {name: gpu1, device: "cuda:1"}
    breaker: {consecutive_failures: 3, cooldown_s: 2}
    retry: {max_attempts: 2, attempt_timeout_s: 0.5}
    hedging: {delay_s: 0.2}
    fallbacks: [llama-remote]
  - name: llama-canary
    replicas: [{name: cpu0}]
  - name: llama-remote
    replicas: [{name: openai, backend: remote_openai, url: "https://api.example/v1"}]
aliases:
  chat: {llama-gpu: 95, llama-canary: 5}
tasks: {chat: chat, code: llama-remote}
"""


def load(text: str) -> RoutingConfig:
    config: RoutingConfig = _build(RoutingConfig, yaml.safe_load(text), "routing")
    return config


def test_example_loads_with_types_and_defaults() -> None:
    config = load(EXAMPLE)
    gpu = config.deployment("llama-gpu")
    assert gpu.model_name == "llama-3.2-1b"
    assert config.deployment("llama-canary").model_name == "llama-canary"
    assert gpu.balancer == "affinity"
    assert [(r.name, r.device, r.weight) for r in gpu.replicas] == [
        ("gpu0", "cuda:0", 2.0),
        ("gpu1", "cuda:1", 1.0),
    ]
    assert (gpu.breaker.consecutive_failures, gpu.breaker.cooldown_s) == (3, 2.0)
    assert gpu.breaker.error_rate == 0.5  # default kept
    assert (gpu.retry.max_attempts, gpu.retry.attempt_timeout_s) == (2, 0.5)
    assert gpu.hedging.enabled
    assert gpu.fallbacks == ("llama-remote",)
    assert config.deployment("llama-remote").replicas[0].remote
    assert dict(config.aliases["chat"]) == {"llama-gpu": 95.0, "llama-canary": 5.0}
    assert dict(config.tasks) == {"chat": "chat", "code": "llama-remote"}


def test_empty_section_is_valid() -> None:
    assert load("{}") == RoutingConfig()


def test_python_built_config_is_validated_by_validate() -> None:
    bad = RoutingConfig(
        deployments=(DeploymentConfig("a", (ReplicaConfig("r", weight=0.0),)),),
    )
    with pytest.raises(ValueError, match=r"routing\.deployments\['a'\]\.replicas\['r'\]\.weight"):
        bad.validate()


def _deployments(*specs: str) -> str:
    return "deployments:\n" + "".join(f"  - {spec}\n" for spec in specs)


A = "{name: a, replicas: [{name: r0}]}"
B = "{name: b, replicas: [{name: r0}]}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _deployments("{name: a, replicas: [{name: r0}], fallbacks: [nope]}", B),
            r"routing\.deployments\['a'\]\.fallbacks names unknown deployment 'nope'; "
            r"deployments: \['a', 'b'\]",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], fallbacks: [a]}"),
            r"fallbacks names the deployment itself",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], fallbacks: [b, b]}", B),
            r"fallbacks=\['b', 'b'\] repeats a deployment",
        ),
        (
            _deployments(
                "{name: a, replicas: [{name: r0}], fallbacks: [b]}",
                "{name: b, replicas: [{name: r0}], fallbacks: [c]}",
                "{name: c, replicas: [{name: r0}], fallbacks: [a]}",
            ),
            r"fallbacks form a cycle a -> b -> c -> a",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0, weight: 0}]}"),
            r"routing\.deployments\['a'\]\.replicas\['r0'\]\.weight=0\.0 must be a positive",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0, weight: -2}]}"),
            r"\.weight=-2\.0 must be a positive",
        ),
        (_deployments("{name: a, replicas: []}"), r"deployments\['a'\]\.replicas is empty"),
        (_deployments(A, A), r"deployments has duplicate name 'a'"),
        (
            _deployments("{name: a, replicas: [{name: r0}, {name: r0}]}"),
            r"deployments\['a'\]\.replicas has duplicate name 'r0'",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0, device: cpu, url: 'http://h/v1'}]}"),
            r"replicas\['r0'\] sets both device='cpu' and url='http://h/v1'",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], balancer: random}"),
            r"balancer='random' must be one of \['p2c', 'round_robin', 'affinity'\]",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], breaker: {error_rate: 1.5}}"),
            r"deployments\['a'\]\.breaker\.error_rate=1\.5 must be in \(0, 1\]",
        ),
        (
            _deployments(
                "{name: a, replicas: [{name: r0}], breaker: {cooldown_s: 10, max_cooldown_s: 5}}"
            ),
            r"breaker\.max_cooldown_s=5\.0 is below cooldown_s=10\.0",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], retry: {max_attempts: 0}}"),
            r"deployments\['a'\]\.retry\.max_attempts=0 must be an integer >= 1",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], retry: {budget_ratio: -0.1}}"),
            r"retry\.budget_ratio=-0\.1 must be a number >= 0",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], hedging: {delay_s: -1}}"),
            r"hedging\.delay_s=-1\.0 must be a number >= 0",
        ),
        (
            _deployments("{name: a, replicas: [{name: r0}], retry: {attempts: 3}}"),
            r"unknown keys \['attempts'\]",
        ),
        (
            _deployments(A) + "aliases: {chat: {z: 1}}",
            r"aliases\['chat'\] names unknown deployment 'z'",
        ),
        (
            _deployments(A) + "aliases: {chat: {a: 0}}",
            r"aliases\['chat'\]\['a'\]=0\.0 must be a positive",
        ),
        (_deployments(A) + "aliases: {chat: {}}", r"aliases\['chat'\] is empty"),
        (_deployments(A) + "aliases: {a: {a: 1}}", r"aliases\['a'\] has the name of a deployment"),
        (
            _deployments(A) + "tasks: {code: coder}",
            r"tasks\['code'\]='coder' is neither a deployment nor an alias; known: \['a'\]",
        ),
    ],
)
def test_bad_values_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(text)


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_retries_per_s", float("nan")), ("budget_window_s", 0.0), ("attempt_timeout_s", -1.0)],
)
def test_retry_numbers_are_checked(field: str, value: Any) -> None:
    retry = RetryConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"x\.{field}="):
        retry.check("x")

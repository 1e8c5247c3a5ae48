"""The `routing:` section: aliases → deployments → replicas, and each deployment's policy.

A client names an alias (a weighted split across deployments, for A/B tests and canaries), a
deployment, or a task (chat, code, tools ...) routed to one of those. A deployment is a set of
replicas serving one model, with its own balancer, circuit breakers, retries, hedging and an
ordered fallback chain. Everything is validated at load time by `RoutingConfig.validate`, whose
messages name the bad field by path and name (`routing.deployments['llama'].replicas['gpu1']...`).

This module must not import `router.config` (which will import it): errors are `ValueError`, which
the loader turns into `ConfigError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

BalancerKind = Literal["p2c", "round_robin", "affinity"]
BALANCER_KINDS: tuple[BalancerKind, ...] = ("p2c", "round_robin", "affinity")


def _positive(where: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}={value!r} must be a positive number")


def _not_negative(where: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}={value!r} must be a number >= 0")


def _at_least(where: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}={value!r} must be an integer >= {low}")


API_KEY_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
"""An environment variable's name, as a replica names the one holding its API key."""


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """One copy of a deployment's model: a local engine on a device, or a remote URL."""

    name: str
    """Unique within its deployment; names the replica in logs, metrics and errors."""
    backend: str = "onnxruntime"
    """Backend kind, as accepted by backends.base.create_backend (or a remote kind)."""
    device: str = ""
    """Device of a local engine ('cpu', 'cuda:0', 'GPU.1' ...); empty means 'cpu' unless url is
    set."""
    url: str = ""
    """Base URL of a remote backend (http://host:port/v1); empty for a local engine."""
    weight: float = 1.0
    """Relative share of the deployment's traffic this replica takes (> 0)."""
    remote_model: str = ""
    """Model name on a remote server; empty: the model's `remote.model`, else its name."""
    dialect: str = ""
    """An openai_http replica's server kind; empty: the model's `remote.dialect`."""
    api_key_env: str = ""
    """An openai_http replica's API key: the environment variable holding it (empty: the
    model's `remote.api_key`)."""
    api_version: str = ""
    """Dialect azure: the API version (empty: the model's `remote.api_version`)."""

    @property
    def remote(self) -> bool:
        return bool(self.url)

    def check(self, where: str) -> None:
        if not self.name:
            raise ValueError(f"{where}.name must not be empty")
        if not self.backend:
            raise ValueError(f"{where}.backend must not be empty")
        if self.device and self.url:
            raise ValueError(
                f"{where} sets both device={self.device!r} and url={self.url!r}; a replica is "
                "either a local engine on a device or a remote URL"
            )
        # The URL's form is the backend's business (http://host:port for openai_http, host:port
        # for kserve_grpc): checked where the replica's model config is built.
        _positive(f"{where}.weight", self.weight)
        if self.remote_model and not self.url:
            raise ValueError(f"{where}.remote_model applies to a remote replica (one with a url)")
        if self.api_key_env and not API_KEY_ENV_RE.fullmatch(self.api_key_env):
            raise ValueError(
                f"{where}.api_key_env={self.api_key_env!r} is not an environment variable's "
                "name: a letter or '_', then up to 127 letters, digits or '_'"
            )


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checks: each replica is asked whether it is ready (a remote server's model
    list or readiness RPC, a local engine's thread) every interval, besides the breaker's
    passive verdicts on real calls."""

    interval_s: float = 5.0
    """Time between two checks of a replica; 0 turns active checks off."""
    timeout_s: float = 2.0
    """A check that has not answered after this long failed."""
    unhealthy_after: int = 2
    """Failed checks in a row that take a replica out of rotation."""
    healthy_after: int = 1
    """Passed checks in a row that put it back."""

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def check(self, where: str) -> None:
        _not_negative(f"{where}.interval_s", self.interval_s)
        _positive(f"{where}.timeout_s", self.timeout_s)
        _at_least(f"{where}.unhealthy_after", self.unhealthy_after, 1)
        _at_least(f"{where}.healthy_after", self.healthy_after, 1)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Per-replica circuit breaker: when to stop sending calls to a failing replica, and when to
    try it again."""

    consecutive_failures: int = 5
    """Open after this many failures in a row."""
    error_rate: float = 0.5
    """Also open when at least this share of the calls in the window failed (1.0: only when all
    did)."""
    window_s: float = 10.0
    """Length of the sliding window the error rate is measured over."""
    min_requests: int = 20
    """Calls the window must hold before the error rate can open the breaker."""
    cooldown_s: float = 5.0
    """Open → half-open after this long; doubled after each failed probe, up to max_cooldown_s."""
    max_cooldown_s: float = 60.0
    """Longest cool-down after repeated failed probes."""
    half_open_probes: int = 1
    """Calls let through at once while half-open; the first success closes the breaker, a failure
    re-opens it."""

    def check(self, where: str) -> None:
        _at_least(f"{where}.consecutive_failures", self.consecutive_failures, 1)
        if isinstance(self.error_rate, bool) or not 0 < self.error_rate <= 1:
            raise ValueError(f"{where}.error_rate={self.error_rate!r} must be in (0, 1]")
        _positive(f"{where}.window_s", self.window_s)
        _at_least(f"{where}.min_requests", self.min_requests, 1)
        _positive(f"{where}.cooldown_s", self.cooldown_s)
        _positive(f"{where}.max_cooldown_s", self.max_cooldown_s)
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError(
                f"{where}.max_cooldown_s={self.max_cooldown_s} is below "
                f"cooldown_s={self.cooldown_s}; make it at least as long"
            )
        _at_least(f"{where}.half_open_probes", self.half_open_probes, 1)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Retries on another replica, before the first token only, bounded by a budget."""

    max_attempts: int = 3
    """Attempts per deployment, the first included (1: no retries)."""
    budget_ratio: float = 0.2
    """Retries (and hedges) may add at most this share of the deployment's recent requests."""
    min_retries_per_s: float = 5.0
    """Retries always allowed per second on top of the ratio, so a quiet deployment can retry."""
    budget_window_s: float = 10.0
    """How far back 'recent requests' reaches."""
    attempt_timeout_s: float = 0.0
    """Longest one attempt may take to answer (unary) or to send its first token (streams)
    before it is abandoned and retried elsewhere; 0: only the caller's deadline applies."""

    def check(self, where: str) -> None:
        _at_least(f"{where}.max_attempts", self.max_attempts, 1)
        _not_negative(f"{where}.budget_ratio", self.budget_ratio)
        _not_negative(f"{where}.min_retries_per_s", self.min_retries_per_s)
        _positive(f"{where}.budget_window_s", self.budget_window_s)
        _not_negative(f"{where}.attempt_timeout_s", self.attempt_timeout_s)


@dataclass(frozen=True, slots=True)
class HedgingConfig:
    """Backup requests for unary calls: a slow first attempt races a second one elsewhere."""

    delay_s: float = 0.0
    """Send a hedge when the call has not answered after this long; 0 disables hedging."""
    max_hedges: int = 1
    """Hedges per call, each on a replica not tried yet; each one spends retry budget."""

    @property
    def enabled(self) -> bool:
        return self.delay_s > 0 and self.max_hedges > 0

    def check(self, where: str) -> None:
        _not_negative(f"{where}.delay_s", self.delay_s)
        _at_least(f"{where}.max_hedges", self.max_hedges, 0)


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """Replicas serving one model, and how calls are spread over them."""

    name: str
    """Unique among deployments and aliases; clients and fallback chains use it."""
    replicas: tuple[ReplicaConfig, ...]
    """At least one."""
    model: str = ""
    """Model the replicas serve (a models[] name); empty means the deployment's name."""
    balancer: BalancerKind = "p2c"
    """'p2c': least outstanding calls of two random replicas (default); 'round_robin';
    'affinity': the same key (conversation or prompt prefix) goes to the same replica while it
    is healthy, p2c for calls without a key."""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    """Circuit breaker settings, one breaker per replica."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries before the first token, per-attempt timeout, retry budget."""
    hedging: HedgingConfig = field(default_factory=HedgingConfig)
    """Backup requests for unary calls (off by default)."""
    fallbacks: tuple[str, ...] = ()
    """Deployments tried in this order when this one cannot answer; their own fallbacks follow
    theirs (cycles are refused)."""
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    """Active health checks of the replicas."""

    @property
    def model_name(self) -> str:
        return self.model or self.name

    def check(self, where: str) -> None:
        if not self.name:
            raise ValueError(f"{where}.name must not be empty")
        if not self.replicas:
            raise ValueError(f"{where}.replicas is empty; list at least one replica")
        seen: set[str] = set()
        for i, replica in enumerate(self.replicas):
            label = f"{where}.replicas[{replica.name!r}]" if replica.name else f"{where}[{i}]"
            replica.check(label)
            if replica.name in seen:
                raise ValueError(f"{where}.replicas has duplicate name {replica.name!r}")
            seen.add(replica.name)
        if self.balancer not in BALANCER_KINDS:
            raise ValueError(
                f"{where}.balancer={self.balancer!r} is unknown; use one of {BALANCER_KINDS}"
            )
        self.breaker.check(f"{where}.breaker")
        self.retry.check(f"{where}.retry")
        self.hedging.check(f"{where}.hedging")
        self.health_check.check(f"{where}.health_check")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Deployments, the aliases that split traffic across them, and task routes."""

    deployments: tuple[DeploymentConfig, ...] = ()
    """Every deployment the router can send calls to."""
    aliases: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Alias → {deployment: weight}: each call picks one deployment with probability
    weight / sum (e.g. {stable: 95, canary: 5})."""
    tasks: Mapping[str, str] = field(default_factory=dict)
    """Task name (chat, code, tools ...) → alias or deployment, for calls that name a task rather
    than a model."""

    def deployment(self, name: str) -> DeploymentConfig:
        for deployment in self.deployments:
            if deployment.name == name:
                return deployment
        raise KeyError(name)

    def validate(self) -> RoutingConfig:
        where = "routing"
        names: set[str] = set()
        for i, deployment in enumerate(self.deployments):
            label = (
                f"{where}.deployments[{deployment.name!r}]"
                if deployment.name
                else f"{where}.deployments[{i}]"
            )
            deployment.check(label)
            if deployment.name in names:
                raise ValueError(f"{where}.deployments has duplicate name {deployment.name!r}")
            names.add(deployment.name)
        known = sorted(names)
        for deployment in self.deployments:
            label = f"{where}.deployments[{deployment.name!r}].fallbacks"
            for target in deployment.fallbacks:
                if target not in names:
                    raise ValueError(
                        f"{label} names unknown deployment {target!r}; deployments: {known}"
                    )
                if target == deployment.name:
                    raise ValueError(f"{label} names the deployment itself")
            if len(set(deployment.fallbacks)) != len(deployment.fallbacks):
                raise ValueError(f"{label}={list(deployment.fallbacks)} repeats a deployment")
        cycle = _fallback_cycle({d.name: d.fallbacks for d in self.deployments})
        if cycle:
            raise ValueError(
                f"{where}.deployments fallbacks form a cycle {' -> '.join(cycle)}; a fallback "
                "chain must end"
            )
        for alias, targets in self.aliases.items():
            label = f"{where}.aliases[{alias!r}]"
            if not alias:
                raise ValueError(f"{where}.aliases has an empty name")
            if alias in names:
                raise ValueError(f"{label} has the name of a deployment; rename one of them")
            if not targets:
                raise ValueError(f"{label} is empty; map at least one deployment to a weight")
            for target, weight in targets.items():
                if target not in names:
                    raise ValueError(
                        f"{label} names unknown deployment {target!r}; deployments: {known}"
                    )
                _positive(f"{label}[{target!r}]", weight)
        routable = names | set(self.aliases)
        for task, target in self.tasks.items():
            if not task:
                raise ValueError(f"{where}.tasks has an empty task name")
            if target not in routable:
                raise ValueError(
                    f"{where}.tasks[{task!r}]={target!r} is neither a deployment nor an alias; "
                    f"known: {sorted(routable)}"
                )
        return self


def _fallback_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str]:
    """One cycle of the fallback graph as [a, b, ..., a], or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str]:
        path.append(node)
        on_path.add(node)
        for nxt in graph.get(node, ()):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        on_path.discard(node)
        path.pop()
        done.add(node)
        return []

    for start in graph:
        if start not in done:
            found = visit(start)
            if found:
                return found
    return []

"""What a load test does, as one frozen `Scenario` built from a YAML mapping (or CLI flags turned
into the same mapping) and validated field by field: a bad value raises `ScenarioError` naming the
field, the value and what would be accepted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from loadtest.harness.fields import (
    ScenarioError,
    flag,
    mapping,
    positive_float,
    positive_int,
    string,
)
from loadtest.harness.token_dist import TokenDist, parse_max_tokens

__all__ = [
    "Scenario",
    "ScenarioError",
    "Stage",
    "TokenDist",
    "load_scenario_file",
    "parse_max_tokens",
    "scenario_from_dict",
]

GRPC_METHODS = ("Generate", "Complete", "Embed", "Search", "ListModels")
HTTP_METHODS = ("chat", "chat-stream", "completions", "completions-stream", "embeddings")
STREAMING_METHODS = frozenset({"Generate", "chat-stream", "completions-stream"})
TOKEN_METHODS = frozenset(
    {"Generate", "Complete", "chat", "chat-stream", "completions", "completions-stream"}
)
SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Stage:
    """One load level: closed loop at `concurrency`, or open loop at `rate` requests/s."""

    concurrency: int | None = None
    """Requests kept in flight (closed loop)."""
    rate: float | None = None
    """Poisson arrival rate in requests/s (open loop)."""
    max_concurrency: int | None = None
    """Open loop only: cap on requests in flight (arrivals beyond it wait in the client)."""

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"concurrency={self.concurrency}"
        return f"rate={self.rate:g}/s"


@dataclass(frozen=True)
class Scenario:
    """A whole load test; `stages()` lists the load levels it runs one after the other."""

    target: str
    """grpc://host:port (the router) or http://host:port (the OpenAI proxy)."""
    mix: tuple[tuple[str, float], ...]
    """Methods and their relative weights."""
    mode: Literal["closed", "open", "sweep"]
    """closed: N in flight; open: Poisson arrivals; sweep: several closed or open stages."""
    concurrency: tuple[int, ...] = ()
    """Closed loop: one value; sweep over concurrency: several."""
    rate: tuple[float, ...] = ()
    """Open loop: one value; sweep over rates: several."""
    max_concurrency: int | None = None
    """Open loop: cap on requests in flight."""
    duration_s: float | None = None
    """Seconds each stage issues requests (in-flight ones finish after)."""
    requests: int | None = None
    """Requests each stage issues (with duration_s: whichever comes first)."""
    processes: int = 1
    """Client processes, each with its own event loop; load is split evenly between them."""
    prompts: str = "builtin"
    """'builtin' (the shipped set of real prompts) or a JSONL file path."""
    max_tokens: TokenDist = field(default_factory=lambda: TokenDist("fixed", 64, 64))
    """max_tokens of generation requests."""
    temperature: float = 0.0
    """Sampling temperature of generation requests."""
    ignore_eos: bool = False
    """Generate exactly max_tokens (vLLM's benchmark flag)."""
    model: str = DEFAULT_MODEL
    """Generation model."""
    embed_model: str = DEFAULT_EMBED_MODEL
    """Embedding model (Embed, embeddings)."""
    collection: str | None = None
    """Collection searched by Search (it must exist)."""
    top_k: int = 4
    """Search results per query."""
    timeout_s: float = 120.0
    """Per-request deadline."""
    slo: tuple[tuple[str, float], ...] = ()
    """Goodput thresholds, e.g. (('ttft_ms', 200.0), ('e2e_ms', 2000.0))."""
    seed: int = 0
    """Seeds prompt, method and max_tokens choices (process i uses seed + i)."""
    honor_retry_info: bool = False
    """Closed loop: after a call shed with a retry delay (gRPC RetryInfo, HTTP Retry-After),
    its client waits that long before its next call, as well-behaved clients do; off, it
    calls again at once (the worst case)."""

    @property
    def protocol(self) -> Literal["grpc", "http"]:
        return "grpc" if self.target.startswith("grpc://") else "http"

    @property
    def address(self) -> str:
        """host:port for gRPC, the base URL for HTTP."""
        return self.target.removeprefix("grpc://") if self.protocol == "grpc" else self.target

    def stages(self) -> list[Stage]:
        if self.concurrency:
            return [Stage(concurrency=c) for c in self.concurrency]
        return [Stage(rate=r, max_concurrency=self.max_concurrency) for r in self.rate]

    def to_dict(self) -> dict[str, Any]:
        """The scenario as the mapping `scenario_from_dict` reads back."""
        load: dict[str, Any] = {"mode": self.mode}
        if self.mode == "sweep":
            key = "concurrency" if self.concurrency else "rate"
            load[key] = list(self.concurrency or self.rate)
        elif self.concurrency:
            load["concurrency"] = self.concurrency[0]
        else:
            load["rate"] = self.rate[0]
        if self.max_concurrency is not None:
            load["max_concurrency"] = self.max_concurrency
        mt = self.max_tokens
        max_tokens: Any = mt.low
        if mt.kind == "uniform":
            max_tokens = {"dist": "uniform", "min": mt.low, "max": mt.high}
        elif mt.kind == "normal":
            max_tokens = {
                "dist": "normal",
                "mean": mt.mean,
                "std": mt.std,
                "min": mt.low,
                "max": mt.high,
            }
        out: dict[str, Any] = {
            "target": self.target,
            "mix": dict(self.mix),
            "load": load,
            "processes": self.processes,
            "prompts": self.prompts,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "ignore_eos": self.ignore_eos,
            "model": self.model,
            "embed_model": self.embed_model,
            "top_k": self.top_k,
            "timeout_s": self.timeout_s,
            "honor_retry_info": self.honor_retry_info,
            "seed": self.seed,
        }
        for key, value in (
            ("duration_s", self.duration_s),
            ("requests", self.requests),
            ("collection", self.collection),
        ):
            if value is not None:
                out[key] = value
        if self.slo:
            out["slo"] = dict(self.slo)
        return out


# ---- parsing ------------------------------------------------------------------------------------

_TOP_KEYS = frozenset(
    {
        "target",
        "mix",
        "load",
        "duration_s",
        "requests",
        "processes",
        "prompts",
        "max_tokens",
        "temperature",
        "ignore_eos",
        "model",
        "embed_model",
        "collection",
        "top_k",
        "timeout_s",
        "slo",
        "seed",
        "honor_retry_info",
    }
)
_LOAD_KEYS = frozenset({"mode", "concurrency", "rate", "max_concurrency"})


def _target(value: object) -> str:
    target = string("target", value)
    parts = urlsplit(target)
    if parts.scheme not in ("grpc", "http", "https") or not parts.hostname or not parts.port:
        raise ScenarioError(
            f"target: {target!r} is not grpc://host:port (the router) "
            "or http://host:port (the OpenAI proxy)"
        )
    return target.rstrip("/")


def _mix(value: object, protocol: str) -> tuple[tuple[str, float], ...]:
    accepted = GRPC_METHODS if protocol == "grpc" else HTTP_METHODS
    items: list[tuple[str, float]]
    if isinstance(value, str):
        items = [(value, 1.0)]
    elif isinstance(value, Mapping) and value:
        items = [(str(k), positive_float(f"mix.{k}", v)) for k, v in value.items()]
    else:
        raise ScenarioError(f"mix: must be a method name or a non-empty mapping, got {value!r}")
    for method, _ in items:
        if method not in accepted:
            raise ScenarioError(
                f"mix: unknown method {method!r} for a {protocol} target "
                f"(accepted: {', '.join(accepted)})"
            )
    return tuple(items)


def _load(value: object) -> tuple[str, tuple[int, ...], tuple[float, ...], int | None]:
    load = mapping("load", value, _LOAD_KEYS)
    mode = load.get("mode")
    if mode not in ("closed", "open", "sweep"):
        raise ScenarioError(f"load.mode: {mode!r} is not one of closed, open, sweep")
    max_conc = load.get("max_concurrency")
    if max_conc is not None:
        max_conc = positive_int("load.max_concurrency", max_conc)
    conc, rate = load.get("concurrency"), load.get("rate")
    if mode == "closed":
        if rate is not None:
            raise ScenarioError("load.rate: not used in closed mode (set load.concurrency)")
        return mode, (positive_int("load.concurrency", conc),), (), None
    if mode == "open":
        if conc is not None:
            raise ScenarioError("load.concurrency: not used in open mode (set load.rate)")
        return mode, (), (positive_float("load.rate", rate),), max_conc
    if (conc is None) == (rate is None):
        raise ScenarioError("load: a sweep needs exactly one of load.concurrency or load.rate")
    values = conc if conc is not None else rate
    key = "concurrency" if conc is not None else "rate"
    if not isinstance(values, list) or not values:
        raise ScenarioError(f"load.{key}: a sweep needs a non-empty list, got {values!r}")
    if conc is not None:
        return (
            mode,
            tuple(positive_int(f"load.concurrency[{i}]", v) for i, v in enumerate(conc)),
            (),
            None,
        )
    return (
        mode,
        (),
        tuple(positive_float(f"load.rate[{i}]", v) for i, v in enumerate(values)),
        max_conc,
    )


def _slo(value: object) -> tuple[tuple[str, float], ...]:
    spec = mapping("slo", value, frozenset(SLO_KEYS))
    return tuple((str(k), positive_float(f"slo.{k}", v)) for k, v in spec.items())


def scenario_from_dict(data: object) -> Scenario:
    """Validate a mapping (a parsed YAML file) into a Scenario."""
    spec = mapping("", data, _TOP_KEYS)
    if "target" not in spec:
        raise ScenarioError("target: missing (grpc://host:port or http://host:port)")
    target = _target(spec["target"])
    protocol = "grpc" if target.startswith("grpc://") else "http"
    if "mix" not in spec:
        methods = ", ".join(GRPC_METHODS if protocol == "grpc" else HTTP_METHODS)
        raise ScenarioError(f"mix: missing (one of {methods} or a mapping of them to weights)")
    mix = _mix(spec["mix"], protocol)
    if "load" not in spec:
        raise ScenarioError("load: missing (e.g. {mode: closed, concurrency: 8})")
    mode, concurrency, rate, max_conc = _load(spec["load"])
    duration = spec.get("duration_s")
    requests = spec.get("requests")
    if duration is None and requests is None:
        raise ScenarioError("duration_s: set duration_s or requests (or both)")
    kwargs: dict[str, Any] = {}
    if duration is not None:
        kwargs["duration_s"] = positive_float("duration_s", duration)
    if requests is not None:
        kwargs["requests"] = positive_int("requests", requests)
    for key in ("processes", "top_k"):
        if key in spec:
            kwargs[key] = positive_int(key, spec[key])
    for key in ("prompts", "model", "embed_model", "collection"):
        if key in spec:
            kwargs[key] = string(key, spec[key])
    if "timeout_s" in spec:
        kwargs["timeout_s"] = positive_float("timeout_s", spec["timeout_s"])
    if "max_tokens" in spec:
        kwargs["max_tokens"] = parse_max_tokens(spec["max_tokens"])
    if "temperature" in spec:
        t = spec["temperature"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 2:
            raise ScenarioError(f"temperature: must be a number in [0, 2], got {t!r}")
        kwargs["temperature"] = float(t)
    for key in ("ignore_eos", "honor_retry_info"):
        if key in spec:
            kwargs[key] = flag(key, spec[key])
    if "seed" in spec:
        seed = spec["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ScenarioError(f"seed: must be an integer, got {seed!r}")
        kwargs["seed"] = seed
    if "slo" in spec:
        kwargs["slo"] = _slo(spec["slo"])
    scenario = Scenario(
        target=target,
        mix=mix,
        mode=mode,  # type: ignore[arg-type]
        concurrency=concurrency,
        rate=rate,
        max_concurrency=max_conc,
        **kwargs,
    )
    if any(m == "Search" for m, _ in mix) and scenario.collection is None:
        raise ScenarioError("collection: Search needs the name of an existing collection")
    if scenario.requests is not None and scenario.requests < scenario.processes:
        raise ScenarioError(
            f"requests: {scenario.requests} is fewer than processes={scenario.processes}"
        )
    return scenario


def load_scenario_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML scenario file (validated later, after CLI overrides)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"scenario file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario file {path}: must hold a mapping, got {data!r}")
    return data

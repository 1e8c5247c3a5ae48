"""Prometheus metrics. One `Metrics` per server with its own registry, so several servers (tests,
workers) in one process never collide on the global registry."""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "irouter_requests", "Calls by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "irouter_request_seconds",
            "Call latency by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "irouter_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "irouter_inter_token_seconds",
            "Time between streamed tokens",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "irouter_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "irouter_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.queue_depth = Gauge(
            "irouter_queue_depth", "Requests waiting for a slot", ["model"], registry=r
        )
        self.prefix_cache_tokens = Counter(
            "irouter_prefix_cache_tokens",
            "Prompt tokens of decoder requests: result=hit found in the prefix cache (their KV "
            "copied, not computed), result=miss computed",
            ["model", "result"],
            registry=r,
        )
        self.prefix_cache_reply_tokens = Counter(
            "irouter_prefix_cache_reply_tokens",
            "Tokens of finished replies an idle decoder engine computed again into its prefix "
            "cache, for the conversations' next turns",
            ["model"],
            registry=r,
        )
        self.slots_in_use = Gauge(
            "irouter_kv_slots_in_use",
            "KV cache slots held by running sequences",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "irouter_batch_size",
            "Sequences (decoders) or texts (encoders) per forward step",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "irouter_step_seconds",
            "Engine step duration",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )

        self.cache_lookups = Counter(
            "irouter_cache_lookups",
            "Cache lookups by layer (l1, l2, semantic, embedding) and result (hit, miss)",
            ["layer", "result"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "irouter_cache_evictions",
            "Entries evicted to stay within the size bound",
            ["layer"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "irouter_cache_bytes", "Bytes held by in-process cache layers", ["layer"], registry=r
        )
        self.cache_errors = Counter(
            "irouter_cache_errors",
            "Cache layer failures (e.g. Redis down); the call goes on without that layer",
            ["layer"],
            registry=r,
        )

        self.breaker_transitions = Counter(
            "irouter_breaker_transitions",
            "Circuit breaker state changes per replica (state: closed, half_open, open)",
            ["deployment", "replica", "state"],
            registry=r,
        )
        self.routing_attempts = Counter(
            "irouter_routing_attempts",
            "Attempts sent to each replica (first tries, retries, hedges and fallbacks)",
            ["deployment", "replica"],
            registry=r,
        )
        self.failed_attempts = Counter(
            "irouter_routing_failed_attempts",
            "Attempts on a replica that failed and were retried elsewhere or handed on",
            ["deployment", "replica"],
            registry=r,
        )
        self.replica_ttft = Histogram(
            "irouter_replica_time_to_first_token_seconds",
            "Seconds from a routed attempt's start to its first token, per replica",
            ["deployment", "replica"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.health_checks = Counter(
            "irouter_replica_health_checks",
            "Active health checks per replica by result (pass, fail)",
            ["deployment", "replica", "result"],
            registry=r,
        )

    def watch_replicas(self, source: Callable[[], Iterable[ReplicaSample]]) -> None:
        """Publish replica state read at scrape time (no cost per call): circuit state, health,
        calls in flight. A bound method is held weakly: the metrics server's thread lives until
        the process exits and must not keep the catalog (and its native engines) alive."""
        self.registry.register(_ReplicaCollector(source))

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", host, port)

    def model_observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)


class ReplicaSample(NamedTuple):
    deployment: str
    replica: str
    circuit_state: int
    """0 closed, 1 half-open, 2 open."""
    healthy: bool
    outstanding: int


class _ReplicaCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[ReplicaSample]]) -> None:
        self._source: Callable[[], Callable[[], Iterable[ReplicaSample]] | None] = (
            weakref.WeakMethod(source) if inspect.ismethod(source) else lambda: source
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["deployment", "replica"]
        state = GaugeMetricFamily(
            "irouter_replica_circuit_state",
            "Circuit breaker state per replica: 0 closed, 1 half-open, 2 open",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "irouter_replica_healthy",
            "1 when the replica's active health checks pass and it is loaded",
            labels=labels,
        )
        outstanding = GaugeMetricFamily(
            "irouter_replica_outstanding", "Calls in flight on the replica", labels=labels
        )
        source = self._source()
        for sample in source() if source is not None else ():
            key = [sample.deployment, sample.replica]
            state.add_metric(key, sample.circuit_state)
            healthy.add_metric(key, 1.0 if sample.healthy else 0.0)
            outstanding.add_metric(key, sample.outstanding)
        yield state
        yield healthy
        yield outstanding


class ModelObserver:
    """Engine and batcher callbacks bound to one model's label values (resolved once)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._batch = metrics.batch_size.labels(model)
        self._step = metrics.step_seconds.labels(model)
        self._queue = metrics.queue_depth.labels(model)
        self._slots = metrics.slots_in_use.labels(model)
        self._prefix_hit = metrics.prefix_cache_tokens.labels(model, "hit")
        self._prefix_miss = metrics.prefix_cache_tokens.labels(model, "miss")
        self._reply_fill = metrics.prefix_cache_reply_tokens.labels(model)

    def on_step(self, batch_size: int, waiting: int, running: int, seconds: float) -> None:
        if batch_size:
            self._batch.observe(batch_size)
            self._step.observe(seconds)
        self._queue.set(waiting)
        self._slots.set(running)

    def on_prefix_cache(self, hit_tokens: int, prompt_tokens: int) -> None:
        self._prefix_hit.inc(hit_tokens)
        self._prefix_miss.inc(prompt_tokens - hit_tokens)

    def on_reply_fill(self, tokens: int) -> None:
        self._reply_fill.inc(tokens)

    def on_batch(self, texts: int, seconds: float) -> None:
        self._batch.observe(texts)
        self._step.observe(seconds)


class CallRecorder:
    """At the end of every guarded call: per-tenant usage metrics and one audit-log line.

    The audit log is JSON lines (time, request id, tenant, subject, auth method, method, model,
    status, tokens, duration), never a credential. Lines are buffered and flushed at least once
    a second by `flush()` (the server's housekeeping task), so a call never waits on the disk.
    """

    def __init__(self, metrics: Metrics, audit_path: str = "") -> None:
        r = metrics.registry
        self._calls = Counter(
            "irouter_tenant_requests", "Calls by tenant and status", ["tenant", "code"], registry=r
        )
        self._tokens = Counter(
            "irouter_tenant_tokens",
            "Tokens by tenant and kind (prompt, completion)",
            ["tenant", "kind"],
            registry=r,
        )
        self._file: TextIO | None = None
        if audit_path == "-":
            self._file = sys.stderr
        elif audit_path:
            path = Path(audit_path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", buffering=1 << 16)

    def on_call_end(self, scope: Any, code: str) -> None:
        identity = scope.identity
        tenant = identity.tenant if identity is not None else ""
        self._calls.labels(tenant, code).inc()
        if scope.prompt_tokens:
            self._tokens.labels(tenant, "prompt").inc(scope.prompt_tokens)
        if scope.completion_tokens:
            self._tokens.labels(tenant, "completion").inc(scope.completion_tokens)
        if self._file is not None:
            record = {
                "time": round(time.time(), 3),
                "request_id": scope.request_id,
                "tenant": tenant,
                "subject": identity.subject if identity is not None else "",
                "auth": identity.method if identity is not None else "",
                "method": scope.method,
                "model": scope.model,
                "status": code,
                "prompt_tokens": scope.prompt_tokens,
                "completion_tokens": scope.completion_tokens,
                "duration_ms": round((time.perf_counter() - scope.started) * 1000, 3),
            }
            if scope.findings:
                record["guardrails"] = sorted(set(scope.findings))
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None

"""Usage metering: every call's prompt and completion tokens, per tenant, key, served name and
model version, priced by the version's prices, kept in the registry and summed by UsageService.

Recording costs a call no database round trip: `record` adds the call to an in-memory bucket
(one per minute, tenant, key, served name, version) and a Prometheus counter, and a background
task writes the buckets every second in one transaction (adding to rows another router may have
written for the same minute). A database that is down keeps the buckets in memory, up to
MAX_PENDING of them, and they are written when it is back; past that the oldest are dropped and
counted (irouter_usage_dropped_buckets_total).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from router.errors import InvalidArgument, RouterError
from router.guard.chain import CallScope
from router.guard.identity import ANONYMOUS_SUBJECT
from router.registry.database import call, reachable
from router.registry.schema import usage as table
from router.telemetry import Metrics

logger = logging.getLogger(__name__)

FLUSH_S = 1.0
MAX_PENDING = 100_000
"""Buckets kept in memory while the database cannot take them."""
GROUPS = ("tenant", "key", "deployment", "model", "version", "day")
"""What GetUsage may group by."""
_NANOS = Decimal(10) ** 9
_ZERO = Decimal(0)
_KEY_COLUMNS = ("minute", "tenant", "key_id", "served", "model_name", "model_version", "currency")


@dataclass(frozen=True, slots=True)
class Pricing:
    """What a served name bills as."""

    model_name: str
    model_version: str
    input_per_1k: Decimal = Decimal(0)
    output_per_1k: Decimal = Decimal(0)
    currency: str = "USD"

    def cost(self, prompt: int, completion: int) -> Decimal:
        if not (self.input_per_1k or self.output_per_1k):
            return _ZERO
        return (self.input_per_1k * prompt + self.output_per_1k * completion) / 1000


BucketKey = tuple[int, str, str, str, str, str, str]
"""(minute, tenant, key id, served name, model name, model version, currency)."""


@dataclass(slots=True)
class Bucket:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of GetUsage's answer; a field not grouped by is ''."""

    tenant: str
    key: str
    deployment: str
    """The model or deployment called."""
    model: str
    version: str
    day: str
    currency: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost: Decimal


class UsageRecorder:
    """Buckets calls in memory and writes them to the registry every second."""

    def __init__(
        self, engine: Engine, metrics: Metrics, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self._clock = clock
        self._prices: dict[str, Pricing] = {}
        self._version_prices: dict[tuple[str, str], Pricing] = {}
        """(served, version) → its prices: during a rollout a served name has two versions."""
        self._replica_versions: dict[str, dict[str, str]] = {}
        """served → {replica: the version it serves}, as the deployment is stored."""
        self._pending: dict[BucketKey, Bucket] = {}
        self._counters: dict[tuple[str, ...], tuple[Any, Any, Any]] = {}
        """Prometheus children by bucket key less its minute: labels() is resolved once."""
        r = metrics.registry
        self._tokens = Counter(
            "irouter_usage_tokens",
            "Tokens billed, by tenant, served name, model version and kind (input, output)",
            ["tenant", "model", "version", "kind"],
            registry=r,
        )
        self._cost = Counter(
            "irouter_usage_cost",
            "Cost billed in the version's currency, by tenant, served name and model version",
            ["tenant", "model", "version", "currency"],
            registry=r,
        )
        self._dropped = Counter(
            "irouter_usage_dropped_buckets",
            "Usage buckets dropped because the registry could not take them in time",
            registry=r,
        )

    def set_pricing(self, served: str, pricing: Pricing | None) -> None:
        """How calls to `served` bill from now on (None: as a model of no version, free)."""
        if pricing is None:
            self._prices.pop(served, None)
            self._replica_versions.pop(served, None)
            for key in [k for k in self._version_prices if k[0] == served]:
                del self._version_prices[key]
        else:
            self._prices[served] = pricing
            self.add_pricing(served, pricing)

    def add_pricing(self, served: str, pricing: Pricing) -> None:
        """Another version `served` has replicas of (a rollout's target): calls its replicas
        serve bill at its prices (set_replica_versions says which replicas)."""
        self._version_prices[served, pricing.model_version] = pricing

    def set_replica_versions(self, served: str, versions: dict[str, str]) -> None:
        """Which version each replica of `served` serves (replica name → version)."""
        self._replica_versions[served] = dict(versions)

    def _price(self, scope: CallScope) -> Pricing:
        """The served name's prices, or those of the version the replica that answered serves
        (a rollout's target bills at its own prices, not the old version's)."""
        price = self._prices.get(scope.model)
        if price is None:
            return Pricing(scope.model, "")
        if scope.served_replica:
            version = self._replica_versions.get(scope.model, {}).get(scope.served_replica)
            if version and version != price.model_version:
                price = self._version_prices.get((scope.model, version), price)
        return price

    def record(self, scope: CallScope) -> None:
        """One finished call (its tokens are on the scope). On the loop, no I/O."""
        if not scope.model or not (scope.prompt_tokens or scope.completion_tokens):
            return
        identity = scope.identity
        tenant = identity.tenant if identity is not None else ANONYMOUS_SUBJECT
        key_id = (identity.key_id or identity.subject) if identity is not None else ""
        price = self._price(scope)
        prompt, completion = scope.prompt_tokens, scope.completion_tokens
        cost = price.cost(prompt, completion)
        minute = int(self._clock()) // 60 * 60
        key = (
            minute,
            tenant,
            key_id,
            scope.model,
            price.model_name,
            price.model_version,
            price.currency,
        )
        bucket = self._pending.get(key)
        if bucket is None:
            bucket = self._pending[key] = Bucket()
        bucket.calls += 1
        bucket.input_tokens += prompt
        bucket.output_tokens += completion
        bucket.cost += cost
        counters = self._counters.get(key[1:])
        if counters is None:
            labels = (tenant, scope.model, price.model_version)
            counters = self._counters[key[1:]] = (
                self._tokens.labels(*labels, "input"),
                self._tokens.labels(*labels, "output"),
                self._cost.labels(*labels, price.currency),
            )
        counters[0].inc(prompt)
        counters[1].inc(completion)
        if cost:
            counters[2].inc(float(cost))

    async def run(self) -> None:
        """Write the buckets every FLUSH_S until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                await self.flush()
        finally:
            if self._pending:
                await asyncio.shield(self.flush())

    async def flush(self) -> None:
        """Write what is pending; on failure keep it for the next flush (bounded)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await call(self._write, batch)
        except RouterError as exc:
            logger.warning("usage not written yet (%d buckets kept): %s", len(batch), exc)
            for key, bucket in batch.items():
                self._merge(key, bucket)
            excess = len(self._pending) - MAX_PENDING
            if excess > 0:
                for key in sorted(self._pending)[:excess]:
                    del self._pending[key]
                self._dropped.inc(excess)

    def _merge(self, key: BucketKey, bucket: Bucket) -> None:
        mine = self._pending.get(key)
        if mine is None:
            self._pending[key] = bucket
            return
        mine.calls += bucket.calls
        mine.input_tokens += bucket.input_tokens
        mine.output_tokens += bucket.output_tokens
        mine.cost += bucket.cost

    def _write(self, batch: dict[BucketKey, Bucket]) -> None:
        rows = [
            {
                **dict(zip(_KEY_COLUMNS, key, strict=True)),
                "calls": b.calls,
                "input_tokens": b.input_tokens,
                "output_tokens": b.output_tokens,
                "cost_nanos": int((b.cost * _NANOS).to_integral_value(ROUND_HALF_EVEN)),
            }
            for key, b in batch.items()
        ]
        insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        statement = insert(table)
        added = {
            column: getattr(table.c, column) + getattr(statement.excluded, column)
            for column in ("calls", "input_tokens", "output_tokens", "cost_nanos")
        }
        statement = statement.on_conflict_do_update(index_elements=_KEY_COLUMNS, set_=added)
        with reachable(self.engine) as connection:
            connection.execute(statement, rows)


def query(engine: Engine, start: float, end: float, group_by: Sequence[str]) -> list[UsageRow]:
    """Totals of [start, end) (epoch seconds, by minute), grouped by `group_by` (of GROUPS)
    and always by currency; blocking."""
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown:
        raise InvalidArgument(f"group_by {unknown} is unknown; use any of {list(GROUPS)}")
    if end <= start:
        raise InvalidArgument("end_time must be after start_time", field="end_time")
    columns = {
        "tenant": table.c.tenant,
        "key": table.c.key_id,
        "deployment": table.c.served,
        "model": table.c.model_name,
        "version": table.c.model_version,
        "day": table.c.minute // 86400 * 86400,
    }
    groups = [columns[g].label(g) for g in dict.fromkeys(group_by)]
    statement = (
        sa.select(
            *groups,
            table.c.currency,
            sa.func.sum(table.c.calls),
            sa.func.sum(table.c.input_tokens),
            sa.func.sum(table.c.output_tokens),
            sa.func.sum(table.c.cost_nanos),
        )
        .where(table.c.minute >= int(start) // 60 * 60, table.c.minute < end)
        .group_by(*groups, table.c.currency)
        .order_by(*groups, table.c.currency)
    )
    names = [*dict.fromkeys(group_by)]
    with reachable(engine) as connection:
        found = connection.execute(statement).all()
    rows = []
    for r in found:
        named = dict(zip(names, r[: len(names)], strict=True))
        currency, calls, inputs, outputs, nanos = r[len(names) :]
        day = named.get("day")
        rows.append(
            UsageRow(
                tenant=str(named.get("tenant", "")),
                key=str(named.get("key", "")),
                deployment=str(named.get("deployment", "")),
                model=str(named.get("model", "")),
                version=str(named.get("version", "")),
                day="" if day is None else datetime.fromtimestamp(int(day), UTC).date().isoformat(),
                currency=str(currency),
                calls=int(calls),
                input_tokens=int(inputs),
                output_tokens=int(outputs),
                cost=Decimal(int(nanos)) / _NANOS,
            )
        )
    return rows

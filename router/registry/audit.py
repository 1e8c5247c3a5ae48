"""The audit log of control-plane changes: who changed what, when, and the record before and
after. Written in the same transaction as the change, so a change and its event are stored
together or not at all."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from router.registry.database import reachable
from router.registry.schema import audit_events


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One change."""

    id: int
    at: float
    """Seconds since the epoch (UTC)."""
    actor: str
    """The caller's subject and tenant ("anonymous" with the guard off)."""
    action: str
    """What was done, as `<thing>.<verb>` ("model_version.register")."""
    target: str
    """What it was done to ("smollm2/2")."""
    before: dict[str, Any]
    """The record before ({} when it was created)."""
    after: dict[str, Any]
    """The record after ({} when it was deleted)."""


def record(
    connection: Connection,
    *,
    at: float,
    actor: str,
    action: str,
    target: str,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
) -> None:
    """Add one event inside the caller's transaction."""
    connection.execute(
        audit_events.insert().values(
            at=at,
            actor=actor,
            action=action,
            target=target,
            before=json.dumps(before, sort_keys=True),
            after=json.dumps(after, sort_keys=True),
        )
    )


def record_change(
    connection: Connection,
    *,
    at: float,
    actor: str,
    action: str,
    target: str,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
) -> None:
    """Add one event for a record changed in place: only the fields that differ."""
    record(
        connection,
        at=at,
        actor=actor,
        action=action,
        target=target,
        before={k: v for k, v in before.items() if after.get(k) != v},
        after={k: v for k, v in after.items() if before.get(k) != v},
    )


def events(engine: Engine, *, target: str = "", limit: int = 100) -> list[AuditEvent]:
    """The newest `limit` events, oldest first; only those about `target` when given."""
    query = sa.select(audit_events).order_by(audit_events.c.id.desc()).limit(limit)
    if target:
        query = query.where(audit_events.c.target == target)
    with reachable(engine) as connection:
        rows = connection.execute(query).all()
    return [
        AuditEvent(
            id=row.id,
            at=row.at,
            actor=row.actor,
            action=row.action,
            target=row.target,
            before=json.loads(row.before),
            after=json.loads(row.after),
        )
        for row in reversed(rows)
    ]

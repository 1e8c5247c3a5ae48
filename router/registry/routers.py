"""Routers' heartbeats in the registry: each router sharing it writes when it was last seen,
every few seconds (reconcile.BEAT_S), so that the others can tell a router that died (its
rollouts are then taken over: router.control.reconcile). Times are each router's own clock
(Unix time): routers of one cluster are expected to keep them in step (NTP), well within the
takeover's margin. Statements block: callers on the event loop use
router.registry.database.call.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from router.registry.database import reachable
from router.registry.schema import routers as table


class RouterBook:
    """When each router was last seen."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def beat(self, name: str, at: float) -> None:
        """Record that router `name` is alive at `at`."""
        with reachable(self.engine) as connection:
            done = connection.execute(
                table.update().where(table.c.name == name).values(seen_at=at)
            ).rowcount
            if not done:
                connection.execute(table.insert().values(name=name, seen_at=at))

    def last_seen(self) -> dict[str, float]:
        """Every router's last heartbeat."""
        with reachable(self.engine) as connection:
            rows = connection.execute(sa.select(table.c.name, table.c.seen_at)).all()
        return {r.name: r.seen_at for r in rows}

"""What a routing reload (SIGHUP) may change, and what it changed: pure comparisons of two
routing configs."""

from __future__ import annotations

import dataclasses

from router.routing.config import RoutingConfig


def structural_changes(old: RoutingConfig, new: RoutingConfig) -> list[str]:
    """What differs between two routing configs beyond what a reload may change."""
    problems = []
    before = {d.name: d for d in old.deployments}
    after = {d.name: d for d in new.deployments}
    if set(before) != set(after):
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        problems.append(f"deployments added {added} / removed {removed}")
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        if a.model_name != b.model_name:
            problems.append(f"deployment {name!r} model {a.model_name!r} -> {b.model_name!r}")
        engines_a = {r.name: dataclasses.replace(r, weight=1.0) for r in a.replicas}
        engines_b = {r.name: dataclasses.replace(r, weight=1.0) for r in b.replicas}
        if engines_a != engines_b:
            problems.append(f"deployment {name!r} replicas (other than their weights)")
    return problems


def routing_diff(old: RoutingConfig, new: RoutingConfig) -> list[str]:
    """What a reload changed, for the log."""
    changes = []
    before = {d.name: d for d in old.deployments}
    for dc in new.deployments:
        if before[dc.name] != dc:
            changes.append(f"deployment {dc.name!r}")
    aliases = {name: dict(split) for name, split in new.aliases.items()}
    if {name: dict(split) for name, split in old.aliases.items()} != aliases:
        changes.append(f"aliases {aliases}")
    if dict(old.tasks) != dict(new.tasks):
        changes.append(f"tasks {dict(new.tasks)}")
    return changes

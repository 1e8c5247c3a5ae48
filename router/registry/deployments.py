"""Deployments in the registry: a registered model version served under a name by replicas
(local engines on devices, or remote servers), with its engines' settings. What a router serves
from them is router/control/; this module holds their rules and rows.

Rows change one generation at a time, like model versions: of two concurrent changes to one
deployment one wins and the other gets ABORTED naming the current generation. Statements block:
callers on the event loop use router.registry.database.call.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, Row

from backends.base import DECODE_KERNELS, PREFILL_GRAPHS
from router.config import REMOTE_BACKENDS
from router.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, quote
from router.guard.limits.config import TierLimits
from router.registry import audit
from router.registry.database import reachable
from router.registry.model_versions import check_name, check_version
from router.registry.remote_server import check_server
from router.registry.schema import deployments as table

LOCAL_BACKENDS = ("onnxruntime", "openvino")
"""Engines a local replica may run (TensorRT-LLM needs a CUDA host: config file only, for now)."""
MAX_REPLICAS = 16
MAX_THREADS = 256
MAX_SLOTS = 256
_REPLICA_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One copy of the deployment's model."""

    name: str
    """Unique within the deployment: 1-32 of a-z, 0-9, '_', '-'."""
    backend: str = "onnxruntime"
    """'onnxruntime' or 'openvino' (local), or 'openai_http' / 'kserve_grpc' (with a url)."""
    device: str = ""
    """OpenVINO device of a local replica ('CPU', 'GPU', ...); '' is the CPU."""
    url: str = ""
    """A remote replica's server."""
    remote_model: str = ""
    """The model's name on that server ('' : the version's remote model, else its name)."""
    weight: float = 1.0
    """Share of the deployment's traffic (> 0)."""
    model_version: str = ""
    """The version it serves: '' is the deployment's; a rollout's target while one runs."""
    dialect: str = ""
    """An openai_http replica's server kind ('' : openai); see backends.openai.wire.DIALECTS."""
    api_key_env: str = ""
    """An openai_http replica's API key: the environment variable holding it on every router
    (the key is never stored)."""
    api_version: str = ""
    """Dialect azure: the API version its requests carry."""


ROLLOUT_STATES = ("running", "completed", "rolled_back")


@dataclass(frozen=True, slots=True)
class Rollout:
    """Moving a deployment to another version of its model by steps of traffic, judged at each
    step by the new version's error rate and time to first token."""

    target_version: str
    from_version: str = ""
    steps: tuple[int, ...] = (10, 50, 100)
    """Percent of the traffic the target takes at each step; increasing, the last 100."""
    step_interval_s: float = 60.0
    """How long each step runs before it is judged."""
    max_error_rate: float = 0.05
    """Failed attempts / attempts on the target's replicas in a step above which it rolls back."""
    max_ttft_p95_s: float = 0.0
    """The target's 95th percentile time to first token in a step above which it rolls back
    (0: not judged)."""
    min_calls: int = 0
    """Attempts the target must have had in a step for the step to pass (0: any)."""
    state: str = "running"
    step: int = 0
    """Index in `steps` of the share the target has now."""
    reason: str = ""
    """Why it rolled back (or what the last step saw)."""
    owner: str = ""
    """The router that runs it ('host:port'); the others mirror what it stores."""

    @property
    def percent(self) -> int:
        return self.steps[self.step] if self.state == "running" else 0


def check_rollout(r: Rollout) -> Rollout:
    """InvalidArgument naming the first parameter that is wrong."""
    check_version(r.target_version, "target_version")
    steps = list(r.steps)
    if not steps or steps[-1] != 100 or any(not 0 < p <= 100 for p in steps):
        raise InvalidArgument(
            f"steps={steps} must be percents in (0, 100] ending at 100", field="steps"
        )
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise InvalidArgument(f"steps={steps} must increase", field="steps")
    if not (math.isfinite(r.step_interval_s) and 0 < r.step_interval_s <= 86_400):
        raise InvalidArgument(
            f"step_interval_s={r.step_interval_s} must be in (0, 86400]", field="step_interval_s"
        )
    if not (math.isfinite(r.max_error_rate) and 0 <= r.max_error_rate <= 1):
        raise InvalidArgument(
            f"max_error_rate={r.max_error_rate} must be in [0, 1]", field="max_error_rate"
        )
    if not (math.isfinite(r.max_ttft_p95_s) and r.max_ttft_p95_s >= 0):
        raise InvalidArgument(
            f"max_ttft_p95_s={r.max_ttft_p95_s} must be >= 0 (0: not judged)",
            field="max_ttft_p95_s",
        )
    if r.min_calls < 0:
        raise InvalidArgument(f"min_calls={r.min_calls} must be >= 0", field="min_calls")
    return r


@dataclass(frozen=True, slots=True)
class Deployment:
    """A model version served under `name`."""

    name: str
    model_name: str
    model_version: str
    replicas: tuple[ReplicaSpec, ...]
    threads: int = 2
    """Intra-op threads of each local replica."""
    max_slots: int = 16
    """Sequences each local replica decodes together (its KV budget with max_context)."""
    max_context: int = 0
    """Prompt plus completion tokens per sequence; 0: the version's limit, at most 2,048."""
    prefix_cache_mb: int = 128
    """KV kept aside for shared prefixes, per local replica; 0 turns it off."""
    prefill_graph: str = "auto"
    """The graph that computes prompts on onnxruntime replicas (ModelConfig.prefill_graph)."""
    decode_kernel: str = "auto"
    """What computes decode steps on onnxruntime replicas (ModelConfig.decode_kernel)."""
    rollout: Rollout | None = None
    """The last rollout to another version (running, completed or rolled back)."""
    require_auth: bool = False
    """Refuse anonymous callers (the guard must be on)."""
    limits: Mapping[str, TierLimits] = dataclasses.field(default_factory=dict)
    """Per service tier: requests and tokens per minute and open streams, per tenant, to this
    deployment alone ('default' required when any is given; the guard must be on)."""
    created_at: float = 0.0
    updated_at: float = 0.0
    created_by: str = ""
    generation: int = 0


def _check_replica(i: int, r: ReplicaSpec) -> None:
    where = f"deployment.replicas[{i}]"
    if not _REPLICA_RE.fullmatch(r.name):
        raise InvalidArgument(
            f"{where}.name {quote(r.name)} is not a replica name: 1-32 of a-z, 0-9, '_', '-'",
            field=f"{where}.name",
        )
    if r.backend in REMOTE_BACKENDS:
        if not r.url:
            raise InvalidArgument(
                f"{where}: backend {r.backend!r} is a remote server; give its url",
                field=f"{where}.url",
            )
        if r.device:
            raise InvalidArgument(
                f"{where}.device {quote(r.device)} applies to a local replica, not a remote one",
                field=f"{where}.device",
            )
        check_server(where, r.backend, r.dialect, r.api_version, r.api_key_env)
    elif r.backend in LOCAL_BACKENDS:
        if r.url or r.remote_model or r.api_key_env or r.api_version or r.dialect:
            raise InvalidArgument(
                f"{where}: backend {r.backend!r} runs here and takes no url, remote_model, "
                "dialect, api_key_env or api_version",
                field=f"{where}.url",
            )
        if r.device and r.backend != "openvino":
            raise InvalidArgument(
                f"{where}.device {quote(r.device)}: devices are chosen with backend 'openvino'; "
                "'onnxruntime' runs on the CPU",
                field=f"{where}.device",
            )
    else:
        raise InvalidArgument(
            f"{where}.backend {quote(r.backend)} is unknown; use one of "
            f"{(*LOCAL_BACKENDS, *REMOTE_BACKENDS)}",
            field=f"{where}.backend",
        )
    if not (math.isfinite(r.weight) and r.weight > 0):
        raise InvalidArgument(f"{where}.weight={r.weight} must be > 0", field=f"{where}.weight")


def validate(d: Deployment) -> Deployment:
    """InvalidArgument naming the first field that is wrong."""
    check_name(d.name, "deployment.name")
    check_name(d.model_name, "deployment.model_name")
    check_version(d.model_version, "deployment.model_version")
    if not d.replicas:
        raise InvalidArgument("deployment.replicas is empty; give at least one replica")
    if len(d.replicas) > MAX_REPLICAS:
        raise InvalidArgument(f"deployment.replicas has {len(d.replicas)}; at most {MAX_REPLICAS}")
    names = [r.name for r in d.replicas]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"deployment.replicas has duplicate names: {names}")
    for i, r in enumerate(d.replicas):
        _check_replica(i, r)
    if d.limits and "default" not in d.limits:
        raise InvalidArgument(
            f"deployment.limits names tiers {sorted(d.limits)} but not 'default', which serves "
            "callers of any other tier; add it",
            field="deployment.limits",
        )
    for tier, limits in d.limits.items():
        try:
            limits.validate(f"deployment.limits[{tier!r}]")
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="deployment.limits") from None
    onnxruntime = any(r.backend == "onnxruntime" for r in d.replicas)
    for key, known in (("prefill_graph", PREFILL_GRAPHS), ("decode_kernel", DECODE_KERNELS)):
        value = getattr(d, key)
        if value not in known:
            raise InvalidArgument(
                f"deployment.{key} {quote(value)} is unknown; use one of {list(known)}",
                field=f"deployment.{key}",
            )
        if value != "auto" and not onnxruntime:
            raise InvalidArgument(
                f"deployment.{key} {quote(value)} applies to onnxruntime replicas; this "
                "deployment has none (leave it unset)",
                field=f"deployment.{key}",
            )
    for key, low, high in (
        ("threads", 1, MAX_THREADS),
        ("max_slots", 1, MAX_SLOTS),
        ("max_context", 0, 1 << 20),
        ("prefix_cache_mb", 0, 1 << 16),
    ):
        value = getattr(d, key)
        if not low <= value <= high:
            raise InvalidArgument(
                f"deployment.{key}={value} must be in [{low}, {high}]", field=f"deployment.{key}"
            )
    return d


def _spec(d: Deployment) -> str:
    return json.dumps(
        {
            "replicas": [dataclasses.asdict(r) for r in d.replicas],
            "threads": d.threads,
            "max_slots": d.max_slots,
            "max_context": d.max_context,
            "prefix_cache_mb": d.prefix_cache_mb,
            "prefill_graph": d.prefill_graph,
            "decode_kernel": d.decode_kernel,
            "rollout": None if d.rollout is None else dataclasses.asdict(d.rollout),
            "require_auth": d.require_auth,
            "limits": {tier: dataclasses.asdict(lim) for tier, lim in d.limits.items()},
        },
        sort_keys=True,
    )


def _row(d: Deployment) -> dict[str, Any]:
    return {
        "name": d.name,
        "model_name": d.model_name,
        "model_version": d.model_version,
        "spec": _spec(d),
        "created_at": d.created_at,
        "updated_at": d.updated_at,
        "created_by": d.created_by,
        "generation": d.generation,
    }


def _deployment(row: Row[Any]) -> Deployment:
    spec = json.loads(row.spec)
    return Deployment(
        name=row.name,
        model_name=row.model_name,
        model_version=row.model_version,
        replicas=tuple(ReplicaSpec(**r) for r in spec["replicas"]),
        threads=spec["threads"],
        max_slots=spec["max_slots"],
        max_context=spec["max_context"],
        prefix_cache_mb=spec["prefix_cache_mb"],
        prefill_graph=spec.get("prefill_graph", "auto"),
        decode_kernel=spec.get("decode_kernel", "auto"),
        rollout=_rollout(spec.get("rollout")),
        require_auth=spec.get("require_auth", False),
        limits={tier: TierLimits(**lim) for tier, lim in spec.get("limits", {}).items()},
        created_at=row.created_at,
        updated_at=row.updated_at,
        created_by=row.created_by,
        generation=row.generation,
    )


def _rollout(data: dict[str, Any] | None) -> Rollout | None:
    if data is None:
        return None
    return Rollout(**{**data, "steps": tuple(data["steps"])})


class DeploymentStore:
    """Deployments in the registry database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._clock = clock

    def insert(self, d: Deployment, actor: str) -> Deployment:
        """Store a new deployment at generation 1; AlreadyExists when the name is taken."""
        now = self._clock()
        stored = dataclasses.replace(
            d, created_at=now, updated_at=now, created_by=actor, generation=1
        )
        row = _row(stored)
        try:
            with reachable(self.engine) as connection:
                connection.execute(table.insert().values(**row))
                audit.record(
                    connection,
                    at=now,
                    actor=actor,
                    action="deployment.create",
                    target=f"deployment/{d.name}",
                    before={},
                    after=row,
                )
        except sa.exc.IntegrityError:
            raise AlreadyExists(f"deployment {quote(d.name)} already exists") from None
        return stored

    def get(self, name: str) -> Deployment:
        with reachable(self.engine) as connection:
            row = connection.execute(sa.select(table).where(table.c.name == name)).first()
        if row is None:
            raise NotFound(f"deployment {quote(name)} does not exist")
        return _deployment(row)

    def all(self) -> list[Deployment]:
        """Every deployment, by name."""
        with reachable(self.engine) as connection:
            rows = connection.execute(sa.select(table).order_by(table.c.name)).all()
        return [_deployment(r) for r in rows]

    def generations(self) -> dict[str, int]:
        """Every deployment's name and generation (what routers poll to converge)."""
        with reachable(self.engine) as connection:
            rows = connection.execute(sa.select(table.c.name, table.c.generation)).all()
        return {r.name: r.generation for r in rows}

    def using(self, model_name: str, model_version: str) -> list[str]:
        """Names of the deployments that serve this model version."""
        with reachable(self.engine) as connection:
            rows = connection.execute(
                sa.select(table.c.name).where(
                    table.c.model_name == model_name, table.c.model_version == model_version
                )
            ).all()
        return [r.name for r in rows]

    def replace(
        self, current: Deployment, changed: Deployment, actor: str, action: str
    ) -> Deployment:
        """Store `changed` in place of `current` (read earlier); ABORTED when it moved on."""
        now = self._clock()
        new = dataclasses.replace(changed, updated_at=now, generation=current.generation + 1)
        before, after = _row(current), _row(new)
        with reachable(self.engine) as connection:
            done = connection.execute(
                table.update()
                .where(table.c.name == current.name, table.c.generation == current.generation)
                .values(**after)
            )
            if done.rowcount != 1:
                raise Aborted(
                    f"deployment {quote(current.name)} changed meanwhile (it is past generation "
                    f"{current.generation}); read it again and retry"
                )
            audit.record_change(
                connection,
                at=now,
                actor=actor,
                action=action,
                target=f"deployment/{current.name}",
                before=before,
                after=after,
            )
        return new

    def delete(self, name: str, actor: str) -> None:
        with reachable(self.engine) as connection:
            row = connection.execute(sa.select(table).where(table.c.name == name)).first()
            if row is None:
                raise NotFound(f"deployment {quote(name)} does not exist")
            connection.execute(table.delete().where(table.c.id == row.id))
            audit.record(
                connection,
                at=self._clock(),
                actor=actor,
                action="deployment.delete",
                target=f"deployment/{name}",
                before=_row(_deployment(row)),
                after={},
            )

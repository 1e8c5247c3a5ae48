"""Model versions in the registry database: each change stored with its audit event in one
transaction. A change is applied only to the generation it was read at, so of two concurrent
changes to one version one wins and the other gets ABORTED naming the current generation.
Statements block: callers on the event loop use a worker thread."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, Row

from router.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    quote,
)
from router.registry import audit
from router.registry.artifacts import Artifact, CheckedArtifact
from router.registry.database import reachable
from router.registry.model_versions import (
    ACTIVE,
    DEPRECATED,
    MAX_DESCRIPTION,
    UPDATABLE,
    ModelVersion,
    check_currency,
    check_schema,
    check_tags,
    check_text,
    price_text,
)
from router.registry.schema import deployments
from router.registry.schema import model_versions as table

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def _row(version: ModelVersion) -> dict[str, Any]:
    a = version.artifact
    return {
        "name": version.name,
        "version": version.version,
        "description": version.description,
        "kind": version.kind,
        "artifact_source": a.artifact.source,
        "artifact_location": a.artifact.location,
        "artifact_remote_backend": a.artifact.remote_backend,
        "artifact_remote_model": a.artifact.remote_model,
        "artifact_remote_dialect": a.artifact.remote_dialect,
        "artifact_remote_api_version": a.artifact.remote_api_version,
        "artifact_remote_api_key_env": a.artifact.remote_api_key_env,
        "artifact_format": a.format,
        "artifact_sha256": a.sha256,
        "artifact_size_bytes": a.size_bytes,
        "artifact_context_length": a.context_length,
        "context_length": version.context_length,
        "input_schema": version.input_schema,
        "output_schema": version.output_schema,
        "input_price_per_1k": price_text(version.input_price_per_1k),
        "output_price_per_1k": price_text(version.output_price_per_1k),
        "currency": version.currency,
        "tags": json.dumps(list(version.tags)),
        "state": version.state,
        "deprecation_reason": version.deprecation_reason,
        "created_at": version.created_at,
        "updated_at": version.updated_at,
        "created_by": version.created_by,
        "generation": version.generation,
    }


def _version(row: Row[Any]) -> ModelVersion:
    artifact = CheckedArtifact(
        artifact=Artifact(
            source=row.artifact_source,
            location=row.artifact_location,
            remote_backend=row.artifact_remote_backend,
            remote_model=row.artifact_remote_model,
            remote_dialect=row.artifact_remote_dialect,
            remote_api_version=row.artifact_remote_api_version,
            remote_api_key_env=row.artifact_remote_api_key_env,
        ),
        format=row.artifact_format,
        kind=row.kind,
        sha256=row.artifact_sha256,
        size_bytes=row.artifact_size_bytes,
        context_length=row.artifact_context_length,
    )
    return ModelVersion(
        name=row.name,
        version=row.version,
        kind=row.kind,
        artifact=artifact,
        context_length=row.context_length,
        description=row.description,
        input_schema=row.input_schema,
        output_schema=row.output_schema,
        input_price_per_1k=Decimal(row.input_price_per_1k),
        output_price_per_1k=Decimal(row.output_price_per_1k),
        currency=row.currency,
        tags=tuple(json.loads(row.tags)),
        state=row.state,
        deprecation_reason=row.deprecation_reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        created_by=row.created_by,
        generation=row.generation,
    )


def _page_token(name: str, row_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([name, row_id]).encode()).decode()


def _after(token: str) -> tuple[str, int]:
    try:
        name, row_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        # Row ids are int4 in PostgreSQL: a forged id past it must not reach the query.
        if isinstance(name, str) and type(row_id) is int and 0 <= row_id < 2**31:
            return name, row_id
    except (ValueError, TypeError):
        pass
    raise InvalidArgument(f"page_token {quote(token)} is not one this server gave")


class ModelVersionStore:
    """Model versions in the registry database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._clock = clock

    def register(self, draft: ModelVersion, actor: str) -> ModelVersion:
        """Store a validated draft (see validate_draft) as generation 1; AlreadyExists when its
        name and version are taken."""
        now = self._clock()
        version = dataclasses.replace(
            draft,
            state=ACTIVE,
            deprecation_reason="",
            created_at=now,
            updated_at=now,
            created_by=actor,
            generation=1,
        )
        row = _row(version)
        try:
            with reachable(self.engine) as connection:
                connection.execute(table.insert().values(**row))
                audit.record(
                    connection,
                    at=now,
                    actor=actor,
                    action="model_version.register",
                    target=version.key,
                    before={},
                    after=row,
                )
        except sa.exc.IntegrityError:
            raise AlreadyExists(
                f"model {quote(draft.name)} already has a version {quote(draft.version)}; "
                "register another version"
            ) from None
        return version

    def get(self, name: str, version: str) -> ModelVersion:
        """The version, or NotFound naming it."""
        with reachable(self.engine) as connection:
            row = connection.execute(
                sa.select(table).where(table.c.name == name, table.c.version == version)
            ).first()
        if row is None:
            raise self._missing(name, version)
        return _version(row)

    def list(
        self,
        *,
        name: str = "",
        kind: str = "",
        tag: str = "",
        include_deprecated: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[ModelVersion], str]:
        """One page of versions by name then registration order, and the next page's token
        ('' on the last page)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size={page_size} must be in [0, {MAX_PAGE_SIZE}]")
        size = page_size or DEFAULT_PAGE_SIZE
        query = sa.select(table).order_by(table.c.name, table.c.id)
        if name:
            query = query.where(table.c.name == name)
        if kind:
            query = query.where(table.c.kind == kind)
        if not include_deprecated:
            query = query.where(table.c.state == ACTIVE)
        if page_token:
            after_name, after_id = _after(page_token)
            query = query.where(
                sa.or_(
                    table.c.name > after_name,
                    sa.and_(table.c.name == after_name, table.c.id > after_id),
                )
            )
        found: list[ModelVersion] = []
        last: Row[Any] | None = None
        more = False
        # Tags are a JSON list in one column: filtered here, in batches, not in SQL (the one
        # query then runs unchanged on SQLite and PostgreSQL).
        with (
            reachable(self.engine) as connection,
            connection.execute(query.execution_options(yield_per=size)) as result,
        ):
            for row in result:
                if tag and tag not in json.loads(row.tags):
                    continue
                if len(found) == size:
                    more = True
                    break
                found.append(_version(row))
                last = row
        token = _page_token(last.name, last.id) if more and last is not None else ""
        return found, token

    def update(
        self,
        name: str,
        version: str,
        changes: Mapping[str, Any],
        actor: str,
        *,
        expected_generation: int = 0,
    ) -> ModelVersion:
        """Apply `changes` (fields of UPDATABLE, already parsed: prices as Decimal, tags as a
        tuple); ABORTED when the version is not at `expected_generation` (when given) or
        changed while this ran."""
        unknown = sorted(set(changes) - set(UPDATABLE))
        if unknown:
            raise InvalidArgument(
                f"update_mask names {unknown}, which cannot change; updatable: {list(UPDATABLE)} "
                "(register a new version to change the artifact, kind or context limit)"
            )
        checks: dict[str, Callable[[Any], Any]] = {
            "description": lambda v: check_text(v, "description", MAX_DESCRIPTION),
            "input_schema": lambda v: check_schema(v, "input_schema"),
            "output_schema": lambda v: check_schema(v, "output_schema"),
            "currency": check_currency,
            "tags": check_tags,
        }
        for field, value in changes.items():
            check = checks.get(field)
            if check is not None:
                check(value)
        return self._change(
            name,
            version,
            actor,
            "model_version.update",
            lambda current: dataclasses.replace(current, **changes),
            expected_generation,
        )

    def deprecate(self, name: str, version: str, reason: str, actor: str) -> ModelVersion:
        """Mark the version deprecated (again: the reason is replaced)."""
        check_text(reason, "reason", MAX_DESCRIPTION)
        return self._change(
            name,
            version,
            actor,
            "model_version.deprecate",
            lambda current: dataclasses.replace(
                current, state=DEPRECATED, deprecation_reason=reason
            ),
            0,
        )

    def delete(self, name: str, version: str, actor: str) -> None:
        """Remove the version; NotFound when there is none."""
        with reachable(self.engine) as connection:
            row = connection.execute(
                sa.select(table).where(table.c.name == name, table.c.version == version)
            ).first()
            if row is None:
                raise self._missing(name, version)
            users = connection.execute(
                sa.select(deployments.c.name).where(
                    deployments.c.model_name == name, deployments.c.model_version == version
                )
            ).all()
            if users:
                raise FailedPrecondition(
                    f"model version {quote(name + '/' + version)} is in use by deployment(s) "
                    f"{sorted(r.name for r in users)}; delete them or roll them to another "
                    "version first"
                )
            connection.execute(table.delete().where(table.c.id == row.id))
            audit.record(
                connection,
                at=self._clock(),
                actor=actor,
                action="model_version.delete",
                target=f"{name}/{version}",
                before=_row(_version(row)),
                after={},
            )

    def _change(
        self,
        name: str,
        version: str,
        actor: str,
        action: str,
        change: Callable[[ModelVersion], ModelVersion],
        expected_generation: int,
    ) -> ModelVersion:
        with reachable(self.engine) as connection:
            row = connection.execute(
                sa.select(table).where(table.c.name == name, table.c.version == version)
            ).first()
            if row is None:
                raise self._missing(name, version)
            current = _version(row)
            if expected_generation and current.generation != expected_generation:
                raise self._raced(current.key, current.generation, expected_generation)
            now = self._clock()
            changed = dataclasses.replace(
                change(current), updated_at=now, generation=current.generation + 1
            )
            before, after = _row(current), _row(changed)
            # Applied only to the generation read above: a concurrent change that committed
            # in between makes this one match no row.
            done = connection.execute(
                table.update()
                .where(table.c.id == row.id, table.c.generation == current.generation)
                .values(**after)
            )
            if done.rowcount != 1:
                now_at = connection.execute(
                    sa.select(table.c.generation).where(table.c.id == row.id)
                ).scalar()
                raise self._raced(current.key, now_at or 0, current.generation)
            audit.record_change(
                connection,
                at=now,
                actor=actor,
                action=action,
                target=current.key,
                before=before,
                after=after,
            )
        return changed

    @staticmethod
    def _raced(key: str, current: int, expected: int) -> Aborted:
        return Aborted(
            f"model version {quote(key)} is at generation {current}, not {expected}: it changed "
            "meanwhile; read it again and retry"
        )

    @staticmethod
    def _missing(name: str, version: str) -> NotFound:
        return NotFound(f"model {quote(name)} has no version {quote(version)}")

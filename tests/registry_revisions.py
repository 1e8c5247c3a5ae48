"""A registry database written by an older router: brought to revision 0005, a model version
stored as that router stored it, then opened as a router opens it now (migrated to the newest
revision). Shared by the migration's tests on SQLite (unit) and PostgreSQL (integration)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from router.registry.artifacts import Artifact, CheckedArtifact
from router.registry.database import MIGRATIONS, create_engine, open_schema
from router.registry.model_versions import ModelVersion
from router.registry.schema import model_versions
from router.registry.version_store import ModelVersionStore, _row

AT_0005 = ModelVersion(
    name="old",
    version="1",
    kind="generate",
    artifact=CheckedArtifact(
        Artifact("remote", "http://10.0.0.7:8000/v1", "openai_http", "m"),
        "remote",
        "generate",
        "",
        0,
        0,
    ),
    context_length=4096,
    created_at=1.0,
    updated_at=1.0,
    created_by="alice@t",
    generation=1,
)
"""A remote version as a router at revision 0005 stored it (no dialect, API version or key)."""


def upgraded_from_0005(url: str, *, cut_short: bool = False) -> ModelVersion:
    """AT_0005 stored in a new database at `url` at revision 0005, read back once the database
    is migrated to the newest revision. `cut_short`: 0006's first column is there already, as
    an upgrade that SQLite committed in part leaves it."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, "0005")
            columns = {c["name"] for c in sa.inspect(connection).get_columns("model_versions")}
            row = {k: v for k, v in _row(AT_0005).items() if k in columns}
            connection.execute(model_versions.insert().values(**row))
            if cut_short:
                connection.execute(
                    sa.text(
                        "ALTER TABLE model_versions ADD COLUMN artifact_remote_dialect TEXT "
                        "NOT NULL DEFAULT ''"
                    )
                )
        open_schema(engine)
        return ModelVersionStore(engine).get(AT_0005.name, AT_0005.version)
    finally:
        engine.dispose()

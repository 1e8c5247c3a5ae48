"""The registry's tables as SQLAlchemy Core sees them, for building statements. The migrations
(router/registry/migrations/) create them; a column added there is added here too."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("artifact_source", sa.String(16), nullable=False),
    sa.Column("artifact_location", sa.Text, nullable=False),
    sa.Column("artifact_remote_backend", sa.String(32), nullable=False),
    sa.Column("artifact_remote_model", sa.Text, nullable=False),
    sa.Column("artifact_format", sa.String(16), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("artifact_size_bytes", sa.BigInteger, nullable=False),
    sa.Column("artifact_context_length", sa.Integer, nullable=False),
    sa.Column("context_length", sa.Integer, nullable=False),
    sa.Column("input_schema", sa.Text, nullable=False),
    sa.Column("output_schema", sa.Text, nullable=False),
    sa.Column("input_price_per_1k", sa.String(40), nullable=False),
    sa.Column("output_price_per_1k", sa.String(40), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("tags", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("deprecation_reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("artifact_remote_dialect", sa.Text, nullable=False, server_default=""),
    sa.Column("artifact_remote_api_version", sa.Text, nullable=False, server_default=""),
    sa.Column("artifact_remote_api_key_env", sa.Text, nullable=False, server_default=""),
    sa.UniqueConstraint("name", "version", name="model_versions_name_version"),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("before", sa.Text, nullable=False),
    sa.Column("after", sa.Text, nullable=False),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("minute", sa.BigInteger, nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(128), nullable=False),
    sa.Column("served", sa.String(64), nullable=False),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("calls", sa.BigInteger, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost_nanos", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint(
        "minute", "tenant", "key_id", "served", "model_name", "model_version", "currency"
    ),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("key_hash", sa.LargeBinary, nullable=False),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("tier", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

routers = sa.Table(
    "routers",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False),
)

"""Model versions and the audit log.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
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
        # Decimal text ("0.0005"): exact in both databases, summed as Decimal by the router.
        sa.Column("input_price_per_1k", sa.String(40), nullable=False),
        sa.Column("output_price_per_1k", sa.String(40), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("tags", sa.Text, nullable=False),  # a JSON list of strings
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("deprecation_reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),  # seconds since the epoch, UTC
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.UniqueConstraint("name", "version", name="model_versions_name_version"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("before", sa.Text, nullable=False),  # JSON object, "{}" when created
        sa.Column("after", sa.Text, nullable=False),  # JSON object, "{}" when deleted
    )
    op.create_index("audit_events_target", "audit_events", ["target", "id"])


def downgrade() -> None:
    op.drop_index("audit_events_target", "audit_events")
    op.drop_table("audit_events")
    op.drop_table("model_versions")

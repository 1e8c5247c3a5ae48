"""Usage: tokens and cost per minute, tenant, key, served name and model version.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("minute", sa.BigInteger, nullable=False),  # epoch seconds, a multiple of 60
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("served", sa.String(64), nullable=False),  # the model or deployment called
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),  # '' for config-file models
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("calls", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_nanos", sa.BigInteger, nullable=False),  # 1e-9 of the currency
        sa.PrimaryKeyConstraint(
            "minute", "tenant", "key_id", "served", "model_name", "model_version", "currency"
        ),
    )


def downgrade() -> None:
    op.drop_table("usage")

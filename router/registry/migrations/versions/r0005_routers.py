"""Routers' heartbeats: when each router sharing the registry was last seen, so that a rollout
whose router died is taken over by another.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "routers",
        sa.Column("name", sa.Text, primary_key=True),  # host:port, as rollouts name their owner
        sa.Column("seen_at", sa.Float, nullable=False),  # Unix time of its last heartbeat
    )


def downgrade() -> None:
    op.drop_table("routers")

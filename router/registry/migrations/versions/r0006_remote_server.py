"""A remote artifact's server: its dialect, the API version dialect azure needs, and the
environment variable holding its API key ('' in the rows written before: openai, no key).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = ("artifact_remote_dialect", "artifact_remote_api_version", "artifact_remote_api_key_env")


def upgrade() -> None:
    # A column already there is kept, as 0004 keeps its table: SQLite commits each ALTER TABLE
    # on its own, so an upgrade cut short is run again over part of it.
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("model_versions")}
    for name in COLUMNS:
        if name not in present:
            column = sa.Column(name, sa.Text, nullable=False, server_default="")
            op.add_column("model_versions", column)


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        for name in COLUMNS:
            batch.drop_column(name)

"""api_keys: drop last_used_at (never written: recording it would cost a write per request)

Revision ID: 0002_drop_api_key_last_used
Revises: 0001_initial
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_drop_api_key_last_used"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:  # batch: SQLite rebuilds the table
        batch.drop_column("last_used_at")


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("last_used_at", sa.Float, nullable=True))

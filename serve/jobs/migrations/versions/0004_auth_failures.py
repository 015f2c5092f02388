"""auth_failures: failed-login and failed-credential counts and lockouts (serve.api.throttle)

Revision ID: 0004_auth_failures
Revises: 0003_webhooks
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_auth_failures"
down_revision = "0003_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_failures",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("lockouts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_failure_at", sa.Float, nullable=False),
        sa.Column("locked_until", sa.Float, nullable=False, server_default=sa.text("0")),
    )
    op.create_index("ix_auth_failures_last_failure_at", "auth_failures", ["last_failure_at"])


def downgrade() -> None:
    op.drop_table("auth_failures")

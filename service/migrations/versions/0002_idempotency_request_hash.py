"""jobs.request_sha256: hash of the canonical job spec sent with an Idempotency-Key.

A retry with the same key must carry the same request; the hash lets the API tell a retry (same job
back) from a reused key with a different body (422) without comparing whole specs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_sha256")

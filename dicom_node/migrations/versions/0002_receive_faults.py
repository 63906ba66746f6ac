"""Receive faults kept per series: instances refused at C-STORE (by reason), how the last
association that brought instances ended when it ended abnormally, and until when an open
association may still deliver instances (completion waits for it).

Revision ID: 0002_receive_faults
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_receive_faults"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("refusals", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("receive_interrupted", sa.String(64), nullable=True))
        batch.add_column(sa.Column("association_open_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("association_open_until")
        batch.drop_column("receive_interrupted")
        batch.drop_column("refusals")

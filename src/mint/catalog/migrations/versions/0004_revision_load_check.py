"""Revisions record a load check (`xxh3_128`) beside their sha256 content address.

The engine verifies a revision's files every time it reads them from the blob store; xxh3_128
over the same bytes is far cheaper to verify than sha256. The column is nullable: revisions
exported before it existed have none, and the engine checks those against their sha256.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("revisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("xxh3_128", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("revisions", schema=None) as batch_op:
        batch_op.drop_column("xxh3_128")

"""Revisions keep the manifest fields this mint does not know (`manifest_extra`).

An imported folder's mint_revision.json may carry fields a newer mint wrote; they are stored
here and written back into every manifest the catalog produces for that revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("revisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("manifest_extra", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("revisions", schema=None) as batch_op:
        batch_op.drop_column("manifest_extra")

"""lifecycle: tags on instances and backups, deletion protection on instances

Revision ID: 0004_lifecycle
Revises: 0003
Create Date: 2026-11-26 17:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_lifecycle'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tags', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('deletion_protection', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tags', sa.JSON(), nullable=False, server_default='{}'))


def downgrade() -> None:
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.drop_column('tags')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('deletion_protection')
        batch_op.drop_column('tags')

"""instances: an index in ListInstances' order (live rows by created_at, id), for keyset paging

Revision ID: 0013_list_order
Revises: 0012_patching
Create Date: 2026-11-27 04:20:00
"""
from __future__ import annotations

from alembic import op

revision = '0013_list_order'
down_revision = '0012_patching'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_instances_live_order', 'instances', ['deleted_at', 'created_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_instances_live_order', table_name='instances')

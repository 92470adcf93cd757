"""backups.request_id: a create's idempotency key, unique per tenant (server/idempotency.py), as instances have

Revision ID: 0008_haclient
Revises: 0008_upgrade
Create Date: 2026-11-26 20:45:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_haclient'
down_revision = '0008_upgrade'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch: SQLite cannot add a constraint to an existing table in place.
    with op.batch_alter_table('backups') as batch:
        batch.add_column(sa.Column('request_id', sa.String(length=64), nullable=True))
        batch.create_unique_constraint('uq_backups_tenant_request', ['tenant_id', 'request_id'])


def downgrade() -> None:
    with op.batch_alter_table('backups') as batch:
        batch.drop_constraint('uq_backups_tenant_request', type_='unique')
        batch.drop_column('request_id')

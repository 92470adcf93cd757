"""events: the event history (API changes and status changes, server/audit.py)

Revision ID: 0004_events
Revises: 0004_lifecycle
Create Date: 2026-11-26 17:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_events'
down_revision = '0005_san'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), primary_key=True, autoincrement=True),
        sa.Column('time', sa.DateTime(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('resource', sa.String(length=128), nullable=False),
        sa.Column('actor', sa.String(length=255), nullable=False),
        sa.Column('request_id', sa.String(length=64), nullable=False),
        sa.Column('method', sa.String(length=128), nullable=False),
        sa.Column('summary', sa.Text(), nullable=False),
        sa.Column('code', sa.String(length=32), nullable=False),
        sa.Column('status', sa.String(length=64), nullable=False),
        sa.Column('previous_status', sa.String(length=64), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
    )
    op.create_index('ix_events_tenant_id', 'events', ['tenant_id', 'id'])
    op.create_index('ix_events_resource', 'events', ['resource', 'id'])
    op.create_index('ix_events_time', 'events', ['time'])


def downgrade() -> None:
    op.drop_index('ix_events_time', table_name='events')
    op.drop_index('ix_events_resource', table_name='events')
    op.drop_index('ix_events_tenant_id', table_name='events')
    op.drop_table('events')

"""day2: maintenance windows, pending maintenance actions and the agents' reported versions
(server/maintenance.py)

Revision ID: 0008_day2
Revises: 0008_hasrv
Create Date: 2026-11-26 20:45:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_day2'
down_revision = '0008_hasrv'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'maintenance_windows',
        sa.Column('instance_id', sa.String(length=36), primary_key=True),
        sa.Column('weekday', sa.Integer(), nullable=False),
        sa.Column('start_minute', sa.Integer(), nullable=False),
        sa.Column('duration_minutes', sa.Integer(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
    )
    op.create_table(
        'pending_maintenance',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('instance_id', sa.String(length=36), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('description', sa.String(length=255), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('apply_now', sa.Boolean(), nullable=False),
        sa.Column('open_key', sa.String(length=80), nullable=True, unique=True),
        sa.Column('task_id', sa.String(length=64), nullable=True),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
    )
    op.create_index('ix_pending_maintenance_instance_id', 'pending_maintenance', ['instance_id'])
    op.create_index('ix_pending_maintenance_state', 'pending_maintenance', ['state'])
    op.create_table(
        'agent_versions',
        sa.Column('instance_id', sa.String(length=36), primary_key=True),
        sa.Column('version', sa.String(length=64), nullable=False),
        sa.Column('boot_id', sa.String(length=64), nullable=False),
        sa.Column('seen_at', sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('agent_versions')
    op.drop_index('ix_pending_maintenance_state', table_name='pending_maintenance')
    op.drop_index('ix_pending_maintenance_instance_id', table_name='pending_maintenance')
    op.drop_table('pending_maintenance')
    op.drop_table('maintenance_windows')

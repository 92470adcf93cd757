"""hasrv: agent stream ownership, the command relay between servers, the server members

Revision ID: 0008_hasrv
Revises: 0004_events
Create Date: 2026-11-26 20:45:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_hasrv'
down_revision = '0004_events'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'agent_streams',
        sa.Column('instance_id', sa.String(length=36), primary_key=True),
        sa.Column('server_name', sa.String(length=128), nullable=False),
        sa.Column('claim', sa.String(length=64), nullable=False),
        sa.Column('hello', sa.LargeBinary(), nullable=False),
        sa.Column('connected_at', sa.DateTime(), nullable=False),
    )
    op.create_index('ix_agent_streams_server_name', 'agent_streams', ['server_name'])
    op.create_table(
        'agent_relay',
        sa.Column('command_id', sa.String(length=128), primary_key=True),
        sa.Column('instance_id', sa.String(length=36), nullable=False),
        sa.Column('origin', sa.String(length=128), nullable=False),
        sa.Column('command', sa.LargeBinary(), nullable=False),
        sa.Column('progress', sa.LargeBinary(), nullable=True),
        sa.Column('result', sa.LargeBinary(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
    )
    op.create_index('ix_agent_relay_instance_id', 'agent_relay', ['instance_id'])
    op.create_table(
        'servers',
        sa.Column('name', sa.String(length=128), primary_key=True),
        sa.Column('agent_address', sa.String(length=255), nullable=False),
        sa.Column('seen_at', sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('servers')
    op.drop_index('ix_agent_relay_instance_id', 'agent_relay')
    op.drop_table('agent_relay')
    op.drop_index('ix_agent_streams_server_name', 'agent_streams')
    op.drop_table('agent_streams')

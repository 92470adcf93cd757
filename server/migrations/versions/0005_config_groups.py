"""configuration groups: the tenants' groups and each instance's group, applied values and pending restart

Revision ID: 0004_config
Revises: 0004_lifecycle
Create Date: 2026-11-26 17:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_config'
down_revision = '0004_lifecycle'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'configurations',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('display_name', sa.String(length=255), nullable=False),
        sa.Column('description', sa.Text(), nullable=False),
        sa.Column('datastore', sa.String(length=64), nullable=False),
        sa.Column('datastore_version', sa.String(length=64), nullable=False),
        sa.Column('values', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
        sa.PrimaryKeyConstraint('id'))
    op.create_index(op.f('ix_configurations_tenant_id'), 'configurations', ['tenant_id'], unique=False)
    op.create_table(
        'instance_configurations',
        sa.Column('instance_id', sa.String(length=36), nullable=False),
        sa.Column('configuration_id', sa.String(length=36), nullable=True),
        sa.Column('applied', sa.JSON(), nullable=False),
        sa.Column('restart_required', sa.Boolean(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['configuration_id'], ['configurations.id']),
        sa.PrimaryKeyConstraint('instance_id'))
    op.create_index(op.f('ix_instance_configurations_configuration_id'), 'instance_configurations',
                    ['configuration_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_instance_configurations_configuration_id'), table_name='instance_configurations')
    op.drop_table('instance_configurations')
    op.drop_index(op.f('ix_configurations_tenant_id'), table_name='configurations')
    op.drop_table('configurations')

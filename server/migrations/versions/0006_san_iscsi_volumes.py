"""san: a host's mode (compute / storage), initiator name and portal; an instance's volume driver, SAN node,
LUN locator and sealed CHAP secret

Revision ID: 0005_san
Revises: 0004_lifecycle
Create Date: 2026-11-26 17:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_san'
down_revision = '0004_config'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mode', sa.String(length=16), nullable=False, server_default='compute'))
        batch_op.add_column(sa.Column('initiator_iqn', sa.String(length=255), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('iscsi_portal', sa.String(length=255), nullable=False, server_default=''))
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('volume_driver', sa.String(length=16), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('storage_host_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('volume_locator', sa.String(length=512), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('volume_chap', sa.Text(), nullable=False, server_default=''))
        batch_op.create_foreign_key('fk_instances_storage_host_id_hosts', 'hosts', ['storage_host_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_constraint('fk_instances_storage_host_id_hosts', type_='foreignkey')
        batch_op.drop_column('volume_chap')
        batch_op.drop_column('volume_locator')
        batch_op.drop_column('storage_host_id')
        batch_op.drop_column('volume_driver')
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_column('iscsi_portal')
        batch_op.drop_column('initiator_iqn')
        batch_op.drop_column('mode')

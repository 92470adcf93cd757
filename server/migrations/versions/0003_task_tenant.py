"""limits: each task's tenant (per-tenant task caps), the stored-backup-bytes quota, scheduled-backup faults

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 15:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_tasks_tenant_id'), ['tenant_id'], unique=False)
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quota_backup_bytes', sa.BigInteger(), nullable=False,
                                      server_default=str(1 << 40)))
    with op.batch_alter_table('backup_schedules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fault_message', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('fault_at', sa.DateTime(), nullable=True))

    # Tasks still to run get their tenant, so the caps count them too.
    bind = op.get_bind()
    tasks = sa.table('tasks', sa.column('id', sa.String), sa.column('resource', sa.String),
                     sa.column('state', sa.String), sa.column('tenant_id', sa.String))
    owners = {'instances': sa.table('instances', sa.column('id', sa.String), sa.column('tenant_id', sa.String)),
              'backups': sa.table('backups', sa.column('id', sa.String), sa.column('tenant_id', sa.String))}
    active = bind.execute(sa.select(tasks.c.id, tasks.c.resource).where(tasks.c.state.in_(('pending', 'running'))))
    for task_id, resource in active.fetchall():
        collection, _, rid = resource.partition('/')
        table = owners.get(collection)
        if table is None:
            continue
        tenant = bind.execute(sa.select(table.c.tenant_id).where(table.c.id == rid)).scalar()
        if tenant is not None:
            bind.execute(tasks.update().where(tasks.c.id == task_id).values(tenant_id=tenant))


def downgrade() -> None:
    with op.batch_alter_table('backup_schedules', schema=None) as batch_op:
        batch_op.drop_column('fault_at')
        batch_op.drop_column('fault_message')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('quota_backup_bytes')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tasks_tenant_id'))
        batch_op.drop_column('tenant_id')

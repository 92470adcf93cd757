"""upgrade: instances.last_upgrade (the last UpgradeInstance's report, server/upgrade.py) and
datastore_versions.package_versions (the template's exact package versions)

Revision ID: 0008_upgrade
Revises: 0008_day2
Create Date: 2026-11-26 20:55:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_upgrade'
down_revision = '0008_day2'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('last_upgrade', sa.JSON(), nullable=True))
    with op.batch_alter_table('datastore_versions') as batch:
        batch.add_column(sa.Column('package_versions', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datastore_versions') as batch:
        batch.drop_column('package_versions')
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('last_upgrade')

"""datastore_versions.template_revision and instances.template_revision: template revisions (patching)

Revision ID: 0012_patching
Revises: 0008_haclient
Create Date: 2026-11-26 21:20:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012_patching'
down_revision = '0008_haclient'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch: SQLite cannot alter a table in place.
    with op.batch_alter_table('datastore_versions') as batch:
        batch.add_column(sa.Column('template_revision', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('template_revision', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('template_revision')
    with op.batch_alter_table('datastore_versions') as batch:
        batch.drop_column('template_revision')

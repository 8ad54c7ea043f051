"""Steps, sequence numbers and step counts are 64-bit everywhere: PostgreSQL's INTEGER is 32-bit
(SQLite's INTEGER is 64-bit already, so there this changes only the declared type). Each run
keeps the digest of its write token (server.keys); runs from before have none, so no one can
write to them.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

WIDENED = {
    "runs": ["steps_done", "seq", "client_seq"],
    "series": ["chunk"],
    "channels": ["step"],
}


def upgrade() -> None:
    _retype(sa.Integer(), sa.BigInteger())
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("write_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("write_key")
    _retype(sa.BigInteger(), sa.Integer())


def _retype(old: sa.types.TypeEngine, new: sa.types.TypeEngine) -> None:
    if op.get_bind().dialect.name == "sqlite":
        return  # the same storage: rebuilding every table would gain nothing
    for table, columns in WIDENED.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(column, type_=new, existing_type=old)

"""Layer names are module paths as torch accepts them (torchvision's
``trunk_output.block1.block1-0``), up to 512 characters: the VARCHAR(64) is widened (PostgreSQL
enforces it; on SQLite, which does not, the tables are rebuilt once so that the declared schema
is the one server/store/schema.py defines).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLES = ("series", "channels")


def upgrade() -> None:
    _retype(sa.String(64), sa.String(512))


def downgrade() -> None:
    _retype(sa.String(512), sa.String(64))


def _retype(old: sa.types.TypeEngine, new: sa.types.TypeEngine) -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("layer", type_=new, existing_type=old, existing_nullable=False)

"""The first schema: runs, sweeps, series chunks, per-channel arrays.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("sweep_id", sa.String(32), index=True),
        sa.Column("config", sa.Text),
        sa.Column("meta", sa.Text),
        sa.Column("final", sa.Text),
        sa.Column("message", sa.Text),
        sa.Column("steps_done", sa.Integer, nullable=False),
        sa.Column("pid", sa.Integer),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("client_seq", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
    )
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("base", sa.Text, nullable=False),
        sa.Column("grid", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "series",
        sa.Column(
            "run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("layer", sa.String(64), primary_key=True),
        sa.Column("stat", sa.String(64), primary_key=True),
        sa.Column("chunk", sa.Integer, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("steps", sa.LargeBinary, nullable=False),
        sa.Column("vals", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "channels",
        sa.Column(
            "run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("layer", sa.String(64), primary_key=True),
        sa.Column("step", sa.Integer, primary_key=True),
        sa.Column("c", sa.Integer, nullable=False),
        sa.Column("vals", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    for table in ("channels", "series", "sweeps", "runs"):
        op.drop_table(table)

"""The BN doctor's diagnoses (bncore.diagnose), one row per run and rule, upserted as the
doctor makes or changes one on ingest, so that a finished run, the runs list and a restarted
server read them without diagnosing again; ``silenced``: the user's mark, kept even before the
rule finds anything.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "diagnoses",
        sa.Column(
            "run_id",
            sa.String(32),
            sa.ForeignKey("runs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("rule", sa.String(64), primary_key=True),
        sa.Column("severity", sa.String(16)),
        sa.Column("layers", sa.Text),
        sa.Column("first_step", INT64),
        sa.Column("last_step", INT64),
        sa.Column("evidence", sa.Text),
        sa.Column("message", sa.Text),
        sa.Column("fix", sa.Text),
        sa.Column("refs", sa.Text),
        sa.Column("silenced", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("diagnoses")

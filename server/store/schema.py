"""The database schema, defined once: the Alembic migrations (server/migrations) create it and
Alembic compares against it (its env.py's target_metadata; a test checks that the migrations
build exactly these tables).

Records are kept by series, one per (run, layer, stat), in chunks of ``CHUNK`` steps: each chunk
is a row holding its steps (int64) and values (float32) as bytes, plus the means of its
``COARSE``-step bins, so a 100k-step series is a few dozen rows to read. Global series (loss,
learning rate, evaluations) have the layer ``""``. Per-channel arrays are kept per (run, layer,
step). A batch of records lands in ``pending`` first (server.store.series). The BN doctor's
diagnoses (bncore.diagnose) are kept per (run, rule) in ``diagnoses`` (server.store.diagnoses).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

CHUNK = 4096  # steps per stored chunk of a series
COARSE = 64  # steps per bin of a chunk's coarse copy (CHUNK // COARSE bins)
#: The largest integer a request may give (a step, a batch's seq, steps_done, an offset): the
#: database keeps 64-bit integers, and 2**62 leaves room for the arithmetic done on them.
MAX_INT = 2**62

#: 64-bit integers: BIGINT on PostgreSQL, whose INTEGER is 32-bit; SQLite's INTEGER is 64-bit.
INT64 = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _run_id(**kwargs: Any) -> sa.Column:
    """The run a row of records belongs to: its rows go when the run is deleted."""
    return sa.Column(
        "run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), **kwargs
    )


#: The longest layer name (a module path) a run may have.
MAX_LAYER_NAME = 512


def _layer(**kwargs: Any) -> sa.Column:
    """The block a row is of (a series of the run as a whole, loss or accuracy: "")."""
    return sa.Column("layer", sa.String(MAX_LAYER_NAME), **kwargs)


metadata = sa.MetaData()
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("sweep_id", sa.String(32), index=True),
    sa.Column("config", sa.Text),
    sa.Column("meta", sa.Text),
    sa.Column("final", sa.Text),
    sa.Column("message", sa.Text),
    sa.Column("steps_done", INT64, nullable=False, default=0),
    sa.Column("pid", sa.Integer),
    sa.Column("seq", INT64, nullable=False, default=0),
    sa.Column("client_seq", INT64, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    # SHA-256 of the run's write token (server.keys): who may post its records and status
    sa.Column("write_key", sa.String(64)),
    sa.Column("finished_at", sa.Float),
)  # fmt: skip
sweeps = sa.Table(
    "sweeps", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("base", sa.Text, nullable=False),
    sa.Column("grid", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("experiment", sa.String(64)),
)  # fmt: skip
series = sa.Table(
    "series", metadata,
    _run_id(primary_key=True),
    _layer(primary_key=True),
    sa.Column("stat", sa.String(64), primary_key=True),
    sa.Column("chunk", INT64, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("steps", sa.LargeBinary, nullable=False),
    sa.Column("vals", sa.LargeBinary, nullable=False),
    sa.Column("coarse", sa.LargeBinary),  # float32 means of COARSE-step bins
)  # fmt: skip
channels = sa.Table(
    "channels", metadata,
    _run_id(primary_key=True),
    _layer(primary_key=True),
    sa.Column("step", INT64, primary_key=True),
    sa.Column("c", sa.Integer, nullable=False),
    sa.Column("vals", sa.LargeBinary, nullable=False),
)  # fmt: skip
pending = sa.Table(
    "pending", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _run_id(nullable=False, index=True),
    sa.Column("body", sa.LargeBinary, nullable=False),  # a batch, as server.store.packing writes it
    sa.Column("created_at", sa.Float, nullable=False),
)  # fmt: skip
diagnoses = sa.Table(
    "diagnoses", metadata,
    _run_id(primary_key=True),
    sa.Column("rule", sa.String(64), primary_key=True),
    # the Diagnosis's fields (bncore.diagnose.findings); NULL: a rule silenced for the run
    # before it found anything
    sa.Column("severity", sa.String(16)),
    sa.Column("layers", sa.Text),  # JSON list
    sa.Column("first_step", INT64),
    sa.Column("last_step", INT64),  # NULL while active
    sa.Column("evidence", sa.Text),  # JSON object
    sa.Column("message", sa.Text),
    sa.Column("fix", sa.Text),
    sa.Column("refs", sa.Text),  # JSON list: the Diagnosis's references
    sa.Column("silenced", sa.Boolean, nullable=False, default=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)  # fmt: skip

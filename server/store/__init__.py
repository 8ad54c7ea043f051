"""The store: runs, sweeps and their records in a SQL database (SQLite by default, in WAL mode;
a PostgreSQL URL works too: everything is SQLAlchemy Core).

Its parts, one job each: ``schema`` (the tables, defined once), ``runs`` (run and sweep rows),
``series`` (the write path of records), ``reads`` (reading them back, without the write lock),
``packing`` (records as bytes and rows), ``diagnoses`` (the BN doctor's, per run and rule).
The schema is created and upgraded by the Alembic migrations in server/migrations.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from server.store.diagnoses import DiagnosisTable
from server.store.reads import SeriesReader
from server.store.runs import RunTable
from server.store.schema import runs
from server.store.series import SeriesWriter

__all__ = ["Store"]


class Store:
    """The database, opened and migrated: ``runs`` (RunTable), ``series`` (SeriesWriter),
    ``reads`` (SeriesReader), ``diagnoses`` (DiagnosisTable), and the two operations that span
    them."""

    def __init__(self, url: str, durability: str = "normal") -> None:
        """``durability`` (SQLite): "normal" keeps every committed batch through a killed
        process; "full" also through a power loss or an OS crash (a sync per commit).
        PostgreSQL syncs each commit by its own default (synchronous_commit=on)."""
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sync = {"normal": "NORMAL", "full": "FULL"}[durability]
            sa.event.listen(self.engine, "connect", partial(_sqlite_pragmas, sync=sync))
        lock = threading.Lock()  # one writer at a time (SQLite has one); readers alongside
        self._write = lock
        self.migrate()
        self.runs = RunTable(self.engine, lock)
        self.series = SeriesWriter(self.engine, lock)
        self.reads = SeriesReader(self.engine)
        self.diagnoses = DiagnosisTable(self.engine, lock)

    def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent.with_name("migrations")))
        with self._write, self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def finish_run(self, run_id: str, status: str, **fields: Any) -> bool:
        """Give the run its final status unless it has one, and fold its pending records;
        True if this call set the status."""
        with self._write:
            with self.engine.begin() as conn:
                done = self.runs.finish(conn, run_id, status, **fields)
                folded = self.series.fold_in(conn, run_id)
            folded()  # committed: now the caches
            self.series.forget(run_id)
        return done

    def delete_run(self, run_id: str) -> None:
        """The run, every record of it and its diagnoses."""
        with self._write:
            with self.engine.begin() as conn:
                self.series.delete_in(conn, run_id)
                self.diagnoses.delete_in(conn, run_id)
                conn.execute(runs.delete().where(runs.c.id == run_id))
            self.series.forget(run_id)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, sync: str) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # in WAL, NORMAL is durable when the process dies; FULL also when the machine does
    cur.execute(f"PRAGMA synchronous={sync}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()

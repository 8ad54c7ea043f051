"""The store: runs, sweeps and their records in a SQL database (SQLite by default, in WAL mode;
a PostgreSQL URL works too: everything is SQLAlchemy Core).

Its parts, one job each: ``schema`` (the tables, defined once), ``runs`` (run and sweep rows),
``series`` (the write path of records), ``reads`` (reading them back, without the write lock),
``packing`` (records as bytes and rows), ``diagnoses`` (the BN doctor's, per run and rule).
The schema is created and upgraded by the Alembic migrations in server/migrations.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
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

__all__ = ["Store", "StoreUnreadable"]


class StoreUnreadable(Exception):
    """The database cannot be opened at start (corrupt, cut short, not BN Scope's, not
    reachable): one line that names it and what to do. Nothing is created in its place."""


class Store:
    """The database, opened and migrated: ``runs`` (RunTable), ``series`` (SeriesWriter),
    ``reads`` (SeriesReader), ``diagnoses`` (DiagnosisTable), and the two operations that span
    them."""

    def __init__(self, url: str, durability: str = "normal") -> None:
        """``durability`` (SQLite): "normal" keeps every committed batch through a killed
        process; "full" also through a power loss or an OS crash (a sync per commit).
        PostgreSQL syncs each commit by its own default (synchronous_commit=on)."""
        self.file: Path | None = None  # SQLite's
        if url.startswith("sqlite:///"):
            self.file = Path(url.removeprefix("sqlite:///"))
            self.file.parent.mkdir(parents=True, exist_ok=True)
            if self.file.exists() and self.file.stat().st_size > 0:
                _check_sqlite(self.file)
        self.engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sync = {"normal": "NORMAL", "full": "FULL"}[durability]
            sa.event.listen(self.engine, "connect", partial(_sqlite_pragmas, sync=sync))
        lock = threading.Lock()  # one writer at a time (SQLite has one); readers alongside
        self._write = lock
        try:
            self.migrate()
        except sa.exc.DatabaseError as exc:
            self.engine.dispose()
            todo = (
                _RESTORE
                if self.file is not None
                else "check --database-url, and that the database server runs"
            )
            raise StoreUnreadable(
                f"the database {self.where} cannot be opened ({_first_line(exc)}): {todo}"
            ) from None
        self.runs = RunTable(self.engine, lock)
        self.series = SeriesWriter(self.engine, lock)
        self.reads = SeriesReader(self.engine)
        self.diagnoses = DiagnosisTable(self.engine, lock)

    @property
    def where(self) -> str:
        """The database, as a person finds it: SQLite's file, PostgreSQL's host and name."""
        if self.file is not None:
            return str(self.file)
        u = self.engine.url
        return f"{u.get_backend_name()} {u.host or 'localhost'}:{u.port or ''}/{u.database}"

    def failure(self, exc: BaseException) -> tuple[int, str]:
        """How a request that failed on the database is answered: 507 when the storage is full
        (nothing acknowledged is lost: the batch was not), else 503; and the sentence."""
        orig = getattr(exc, "orig", exc)
        text = _first_line(exc)
        full = (
            getattr(orig, "sqlstate", None) == "53100"  # PostgreSQL's disk_full
            or getattr(orig, "errno", None) == errno.ENOSPC
            or "disk is full" in text
            or "No space left" in text
        )
        if full:
            place = self.file.parent if self.file is not None else self.where
            return 507, (
                f"the server's storage is full ({place}): this request was not stored and "
                "nothing acknowledged is lost; free space there and send it again"
            )
        return 503, (
            f"the database ({self.where}) could not answer ({text}): nothing acknowledged is "
            "lost; send the request again later"
        )

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


def _first_line(exc: BaseException) -> str:
    """The database's own words, one line (SQLAlchemy adds the statement and a link)."""
    orig = getattr(exc, "orig", None)
    return (str(orig if orig is not None else exc).strip().splitlines() or [""])[0][:300]


#: What to do with a database the server cannot read.
_RESTORE = "restore it from a backup, or move it aside to start afresh"


def _check_sqlite(file: Path) -> None:
    """An existing SQLite file, read-only (nothing written to it, not even the journal mode):
    StoreUnreadable if it is no database, is damaged, or holds no table (SQLite reads a file
    whose pages are gone, its WAL deleted, as an empty database; the server never fills an
    existing file afresh)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{file}?mode=ro", uri=True)) as db:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreUnreadable(f"the database {file} cannot be opened ({exc}): {_RESTORE}") from None
    if not tables:
        raise StoreUnreadable(
            f"the database {file} holds no tables (cut short, or not BN Scope's): {_RESTORE}"
        )

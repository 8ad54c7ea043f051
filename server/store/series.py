"""The write path of records: a batch is stored as it comes, in one row of ``pending``, and
acknowledged; batches are folded into the per-(layer, statistic) chunks of ``series`` (and the
per-channel rows of ``channels``) every FOLD_BATCHES batches or FOLD_SECONDS, so the cost of
rewriting hundreds of open chunks is paid about once a second, not at every batch. Readers see
pending batches too (server.store.reads), so nothing waits for a fold.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import sqlalchemy as sa

from bncore.records import channel_table
from server.store.packing import Batch, channel_rows, coarse_bins, pack, series_of, unpack
from server.store.schema import CHUNK, channels, pending, runs, series

FOLD_BATCHES = 64  # pending batches of a run folded into its chunks at once, at most...
FOLD_SECONDS = 1.0  # ...or once the oldest waited this long (and when the run ends)


class SeriesWriter:
    """Appends batches and folds them; one writer at a time (``lock``, shared with RunTable)."""

    def __init__(self, engine: sa.Engine, lock: threading.Lock) -> None:
        self.engine, self._write = engine, lock
        # the open (last) chunk of each series, as written: (run, layer, stat, chunk) -> arrays
        self._open: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]] = {}
        # run id -> [time of its oldest pending batch, pending batches]
        with engine.connect() as conn:
            self._pending: dict[str, list[float]] = {
                r[0]: [r[1], r[2]]
                for r in conn.execute(
                    sa.select(
                        pending.c.run_id, sa.func.min(pending.c.created_at), sa.func.count()
                    ).group_by(pending.c.run_id)
                )
            }

    def append(self, run_id: str, batch: Batch, client_seq: int | None) -> tuple[int, bool]:
        """Write one batch of records (bncore.records tables) atomically.

        Returns (seq, written): the run's batch sequence number after this call, and False if
        ``client_seq`` showed the batch was already stored (a retried send)."""
        now = time.time()
        with self._write, self.engine.begin() as conn:
            row = conn.execute(
                sa.select(runs.c.seq, runs.c.client_seq, runs.c.steps_done).where(
                    runs.c.id == run_id
                )
            ).first()
            if row is None:
                raise KeyError(run_id)
            seq, last_client, steps_done = row
            if client_seq is not None and client_seq <= last_client:
                return seq, False
            conn.execute(pending.insert().values(run_id=run_id, body=pack(batch), created_at=now))
            waiting = self._pending.setdefault(run_id, [now, 0])
            waiting[1] += 1
            if waiting[1] >= FOLD_BATCHES or now - waiting[0] >= FOLD_SECONDS:
                self.fold_in(conn, run_id)
            steps = batch.get("steps") or {}
            if len(steps.get("step", ())):
                steps_done = max(steps_done, int(np.max(steps["step"])))
            values = {"seq": seq + 1, "steps_done": steps_done}
            if client_seq is not None:
                values["client_seq"] = client_seq
            conn.execute(runs.update().where(runs.c.id == run_id).values(**values))
        return seq + 1, True

    def fold(self, run_id: str) -> None:
        """Fold the run's pending batches into its series and channels now."""
        if run_id in self._pending:
            with self._write, self.engine.begin() as conn:
                self.fold_in(conn, run_id)

    def fold_in(self, conn: sa.Connection, run_id: str) -> None:
        """:meth:`fold`, in the caller's transaction (which holds the lock)."""
        if run_id not in self._pending:
            return
        rows = conn.execute(
            sa.select(pending.c.id, pending.c.body)
            .where(pending.c.run_id == run_id)
            .order_by(pending.c.id)
        ).all()
        if not rows:
            self._pending.pop(run_id, None)
            return
        chunks: dict[tuple[str, str, int], dict[str, Any]] = {}  # the latest of each chunk
        chan: list[dict[str, Any]] = []
        batches = [unpack(r[1]) for r in rows]
        for name in dict.fromkeys(t for b in batches for t in b):
            tables = [b[name] for b in batches if name in b]
            # runs of tables with the same columns, in order: a column stays absent where absent
            for _, same in itertools.groupby(tables, key=tuple):
                parts = list(same)
                if name == "channels":  # layers of several widths: ragged rows
                    chan += channel_rows(run_id, channel_table(parts))
                    continue
                table = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
                for c in self._chunks(run_id, {name: table}, conn):
                    chunks[c["layer"], c["stat"], c["chunk"]] = c
        if chunks:
            upsert = _upsert(self.engine, series, ("n", "steps", "vals", "coarse"))
            conn.execute(upsert, list(chunks.values()))
        if chan:
            conn.execute(_upsert(self.engine, channels, ("c", "vals")), chan)
        conn.execute(
            pending.delete().where(pending.c.run_id == run_id, pending.c.id <= rows[-1][0])
        )
        self._pending.pop(run_id, None)

    def delete_in(self, conn: sa.Connection, run_id: str) -> None:
        """Every record of the run, in the caller's transaction."""
        conn.execute(pending.delete().where(pending.c.run_id == run_id))
        self._pending.pop(run_id, None)
        conn.execute(series.delete().where(series.c.run_id == run_id))
        conn.execute(channels.delete().where(channels.c.run_id == run_id))

    def forget(self, run_id: str) -> None:
        """Drop the run's open chunks from memory (it ended, or is gone)."""
        for key in [k for k in self._open if k[0] == run_id]:
            del self._open[key]

    def _chunks(self, run_id: str, batch: Batch, conn: sa.Connection) -> Iterator[dict[str, Any]]:
        """Series chunk rows with this batch appended (the open chunks are kept in memory)."""
        for layer, stat, steps, vals in series_of(batch):
            chunk_of = steps // CHUNK
            for chunk in np.unique(chunk_of):
                sel = chunk_of == chunk
                key = (run_id, layer, stat, int(chunk))
                old = self._open.get(key)
                if old is None:
                    old = read_chunk(conn, key)
                new_steps = np.concatenate([old[0], steps[sel]])
                new_vals = np.concatenate([old[1], vals[sel]])
                self._open[key] = (new_steps, new_vals)
                self._open.pop((run_id, layer, stat, int(chunk) - 1), None)
                yield {
                    "run_id": run_id,
                    "layer": layer,
                    "stat": stat,
                    "chunk": int(chunk),
                    "n": len(new_steps),
                    "steps": new_steps.tobytes(),
                    "vals": new_vals.tobytes(),
                    "coarse": coarse_bins(new_steps, new_vals, int(chunk)).tobytes(),
                }


def read_chunk(
    conn: sa.Connection, key: tuple[str, str, str, int]
) -> tuple[np.ndarray, np.ndarray]:
    row = conn.execute(
        sa.select(series.c.steps, series.c.vals).where(
            series.c.run_id == key[0],
            series.c.layer == key[1],
            series.c.stat == key[2],
            series.c.chunk == key[3],
        )
    ).first()
    if row is None:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    return np.frombuffer(row[0], np.int64), np.frombuffer(row[1], np.float32)


def _upsert(engine: sa.Engine, table: sa.Table, update: tuple[str, ...]) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    dialect: Any = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key.columns],
        set_={c: stmt.excluded[c] for c in update},
    )

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
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import sqlalchemy as sa

from bncore.record.tables import channel_table, channel_widths
from server.errors import Invalid
from server.store.packing import Batch, channel_rows, coarse_bins, pack, series_of, unpack
from server.store.schema import CHUNK, channels, pending, runs, series

FOLD_BATCHES = 64  # pending batches of a run folded into its chunks at once, at most...
FOLD_SECONDS = 1.0  # ...or once the oldest waited this long (and when the run ends)


class SeriesWriter:
    """Appends batches and folds them; one writer at a time (``lock``, shared with RunTable).

    A write is all or nothing: the caches in memory (open chunks, pending counts, channel
    counts) learn of a write only once its transaction has committed, so a write that fails
    (a full disk, a busy database) leaves them as the database is."""

    def __init__(self, engine: sa.Engine, lock: threading.Lock) -> None:
        self.engine, self._write = engine, lock
        # the open (last) chunk of each series, as written: (run, layer, stat, chunk) -> arrays
        self._open: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]] = {}
        # run id -> {layer: its channel count}, as stored (read from the database when needed)
        self._widths: dict[str, dict[str, int]] = {}
        # run id -> bytes of records kept (read from the database when first needed)
        self._kept: dict[str, int] = {}
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
        """Write one batch of records (bncore.record.tables tables) atomically.

        Returns (seq, written): the run's batch sequence number after this call, and False if
        ``client_seq`` showed the batch was already stored (a retried send). Raises Invalid
        (nothing written) for a layer whose channel count is not the one the run has."""
        now = time.time()
        with self._write:
            with self.engine.begin() as conn:
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
                widths = self._checked_widths(conn, run_id, batch)
                body = pack(batch)
                conn.execute(pending.insert().values(run_id=run_id, body=body, created_at=now))
                oldest, count = self._pending.get(run_id, (now, 0))
                folded = None
                if count + 1 >= FOLD_BATCHES or now - oldest >= FOLD_SECONDS:
                    folded = self._fold(conn, run_id)
                steps = batch.get("steps") or {}
                if len(steps.get("step", ())):
                    steps_done = max(steps_done, int(np.max(steps["step"])))
                values = {"seq": seq + 1, "steps_done": steps_done}
                if client_seq is not None:
                    values["client_seq"] = client_seq
                conn.execute(runs.update().where(runs.c.id == run_id).values(**values))
            # committed: only now do the caches learn of it
            if run_id in self._kept:
                self._kept[run_id] += len(body)
            if widths is not None:
                self._widths[run_id] = widths
            if folded is not None:
                folded()
            else:
                self._pending[run_id] = [oldest, count + 1]
        return seq + 1, True

    def fold(self, run_id: str) -> None:
        """Fold the run's pending batches into its series and channels now."""
        if run_id in self._pending:
            with self._write:
                with self.engine.begin() as conn:
                    folded = self._fold(conn, run_id)
                folded()

    def fold_in(self, conn: sa.Connection, run_id: str) -> Callable[[], None]:
        """:meth:`fold`, in the caller's transaction (which holds the lock); what it returns is
        to be called once that transaction has committed (it updates the caches)."""
        if run_id not in self._pending:
            return lambda: None
        return self._fold(conn, run_id)

    def _fold(self, conn: sa.Connection, run_id: str) -> Callable[[], None]:
        rows = conn.execute(
            sa.select(pending.c.id, pending.c.body)
            .where(pending.c.run_id == run_id)
            .order_by(pending.c.id)
        ).all()
        if not rows:

            def nothing_pending() -> None:
                self._pending.pop(run_id, None)

            return nothing_pending
        chunks: dict[tuple[str, str, int], dict[str, Any]] = {}  # the latest of each chunk
        written: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]] = {}
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
                for c in self._chunks(run_id, {name: table}, conn, written):
                    chunks[c["layer"], c["stat"], c["chunk"]] = c
        if chunks:
            upsert = upsert_statement(self.engine, series, ("n", "steps", "vals", "coarse"))
            conn.execute(upsert, list(chunks.values()))
        if chan:
            conn.execute(upsert_statement(self.engine, channels, ("c", "vals")), chan)
        conn.execute(
            pending.delete().where(pending.c.run_id == run_id, pending.c.id <= rows[-1][0])
        )

        def committed() -> None:
            self._pending.pop(run_id, None)
            newest: dict[tuple[str, str, str], int] = {}
            for run, layer, stat, chunk in written:
                newest[run, layer, stat] = max(newest.get((run, layer, stat), chunk), chunk)
            for key, arrays in written.items():  # keep each series' newest chunk open
                if key[3] == newest[key[:3]]:
                    self._open[key] = arrays
                    self._open.pop((*key[:3], key[3] - 1), None)
                else:
                    self._open.pop(key, None)

        return committed

    def delete_in(self, conn: sa.Connection, run_id: str) -> None:
        """Every record of the run, in the caller's transaction (then :meth:`forget` it)."""
        conn.execute(pending.delete().where(pending.c.run_id == run_id))
        conn.execute(series.delete().where(series.c.run_id == run_id))
        conn.execute(channels.delete().where(channels.c.run_id == run_id))

    def kept_bytes(self, run_id: str) -> int:
        """Bytes of records the run keeps (pending batches, series chunks, channel arrays)."""
        if run_id not in self._kept:
            length = sa.func.length
            parts = [
                sa.select(sa.func.coalesce(sa.func.sum(length(pending.c.body)), 0)).where(
                    pending.c.run_id == run_id
                ),
                sa.select(
                    sa.func.coalesce(sa.func.sum(length(series.c.steps) + length(series.c.vals)), 0)
                ).where(series.c.run_id == run_id),
                sa.select(sa.func.coalesce(sa.func.sum(length(channels.c.vals)), 0)).where(
                    channels.c.run_id == run_id
                ),
            ]
            with self.engine.connect() as conn:
                total = sum(int(conn.execute(q).scalar() or 0) for q in parts)
            self._kept.setdefault(run_id, total)
        return self._kept[run_id]

    def forget(self, run_id: str) -> None:
        """Drop what memory holds of the run (it ended and is folded, or is gone)."""
        for key in [k for k in self._open if k[0] == run_id]:
            del self._open[key]
        self._pending.pop(run_id, None)
        self._kept.pop(run_id, None)
        self._widths.pop(run_id, None)

    def _checked_widths(
        self, conn: sa.Connection, run_id: str, batch: Batch
    ) -> dict[str, int] | None:
        """The run's channel count of each layer with this batch's (None if it has no
        per-channel arrays); Invalid if the batch gives a layer another count than the run has
        (its stored rows and pending batches)."""
        ch = batch.get("channels") or {}
        if not len(ch.get("step", ())):
            return None
        known = self._widths.get(run_id)
        if known is None:  # the first since the server started: from the database
            known = self._widths[run_id] = _stored_widths(conn, run_id)
        out = dict(known)
        for layer, c in zip(ch["layer"].tolist(), channel_widths(ch).tolist(), strict=True):
            was = out.setdefault(str(layer), int(c))
            if was != c:
                raise Invalid(
                    f"channels: layer {layer!r} has {was} channels in this run, this batch "
                    f"gives it {c}; a layer's channel count cannot change",
                    field="channels",
                )
        return out

    def _chunks(
        self,
        run_id: str,
        batch: Batch,
        conn: sa.Connection,
        written: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]],
    ) -> Iterator[dict[str, Any]]:
        """Series chunk rows with this batch appended; the chunks' new contents go into
        ``written`` (the open chunks are kept in memory once committed)."""
        for layer, stat, steps, vals in series_of(batch):
            chunk_of = steps // CHUNK
            for chunk in np.unique(chunk_of):
                sel = chunk_of == chunk
                key = (run_id, layer, stat, int(chunk))
                old = written.get(key)
                if old is None:
                    old = self._open.get(key)
                if old is None:
                    old = read_chunk(conn, key)
                new_steps = np.concatenate([old[0], steps[sel]])
                new_vals = np.concatenate([old[1], vals[sel]])
                written[key] = (new_steps, new_vals)
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


def _stored_widths(conn: sa.Connection, run_id: str) -> dict[str, int]:
    """Each layer's channel count, from the run's stored rows and pending batches."""
    out: dict[str, int] = {}
    for layer, c in conn.execute(
        sa.select(channels.c.layer, channels.c.c).where(channels.c.run_id == run_id).distinct()
    ):
        out.setdefault(layer, c)
    for (body,) in conn.execute(
        sa.select(pending.c.body).where(pending.c.run_id == run_id).order_by(pending.c.id)
    ):
        ch = unpack(body).get("channels") or {}
        if len(ch.get("step", ())):
            for layer, c in zip(ch["layer"].tolist(), channel_widths(ch).tolist(), strict=True):
                out.setdefault(str(layer), int(c))
    return out


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


def upsert_statement(engine: sa.Engine, table: sa.Table, update: tuple[str, ...]) -> Any:
    """An INSERT of rows into ``table`` that updates the ``update`` columns of a row whose
    primary key is taken (SQLite and PostgreSQL)."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect: Any = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key.columns],
        set_={c: stmt.excluded[c] for c in update},
    )

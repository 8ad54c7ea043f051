"""The reads: series, their coarse copies and latest values, per-channel arrays. They take no
lock and never write: what is still pending (server.store.series) is read beside what is folded,
and merged by step, so a reader sees every acknowledged batch without waiting for the writer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from bncore import statistics
from bncore.record.tables import (
    CHANNEL_COLUMNS,
    EVAL_COLUMNS,
    OPTIONAL_EVAL_COLUMNS,
    STEP_COLUMNS,
    Table,
    channel_column,
    channel_table,
)
from server.store.packing import coarse_bins, series_of, unpack
from server.store.schema import CHUNK, COARSE, channels, pending, series
from server.store.series import read_chunk as _read_chunk

Key = tuple[str, str]  # (layer, stat); layer "" for a global series
Series = tuple[np.ndarray, np.ndarray]  # (steps int64, values float32)
#: Bytes of decoded chunks kept for the next read (a chunk's content is fixed by its count of
#: points: a fold only appends to it); a read of a finished run's series then fetches no blob.
CHUNK_CACHE_BYTES = 64 * 2**20


def _empty() -> Series:
    return np.empty(0, np.int64), np.empty(0, np.float32)


@dataclass
class _Pending:
    """One pending batch, decoded once and split by series."""

    series: dict[Key, Series]
    channels: dict[str, np.ndarray] | None

    @staticmethod
    def of(body: bytes) -> _Pending:
        batch = unpack(body)
        split = {(layer, stat): (st, v) for layer, stat, st, v in series_of(batch)}
        return _Pending(split, batch.get("channels") or None)


class SeriesReader:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        # pending batches already decoded, by (row id, run, time): SQLite may reuse a row id
        self._decoded: dict[tuple[int, str, float], _Pending] = {}
        # (run, layer, stat, chunk) -> (points, steps, values), least recently used first
        self._chunks: OrderedDict[tuple[str, str, str, int], tuple[int, np.ndarray, np.ndarray]]
        self._chunks = OrderedDict()
        self._chunk_bytes = 0
        self._cache_lock = threading.Lock()  # reads run on several threads at once

    def _series_chunks(
        self, conn: sa.Connection, run_id: str, keys: list[Key], chunk_min: int | None,
        chunk_max: int | None,
    ) -> dict[Key, list[tuple[np.ndarray, np.ndarray]]]:  # fmt: skip
        """The folded chunks of these series in chunk order, decoded; blobs are fetched only
        for chunks not already decoded with the same count of points."""
        wanted = set(keys)

        def query(*columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
            q = _chunks(run_id, keys, series.c.chunk, series.c.n, *columns)
            if chunk_min is not None:
                q = q.where(series.c.chunk >= chunk_min)
            if chunk_max is not None:
                q = q.where(series.c.chunk <= chunk_max)
            return q

        rows = [
            r
            for r in conn.execute(query().order_by(series.c.layer, series.c.stat, series.c.chunk))
            if (r[0], r[1]) in wanted
        ]
        with self._cache_lock:
            cached = {tuple(r[:3]): self._chunks.get((run_id, *r[:3])) for r in rows}
        missing = [r for r in rows if (c := cached[tuple(r[:3])]) is None or c[0] != r[3]]
        if missing:
            fetch = query(series.c.steps, series.c.vals)
            if len(missing) < len(rows):  # only those
                fetch = fetch.where(
                    sa.tuple_(series.c.layer, series.c.stat, series.c.chunk).in_(
                        [tuple(r[:3]) for r in missing]
                    )
                )
            for layer, stat, chunk, n, steps, vals in conn.execute(fetch):
                steps_, vals_ = np.frombuffer(steps, np.int64), np.frombuffer(vals, np.float32)
                self._keep((run_id, layer, stat, chunk), n, steps_, vals_)
        out: dict[Key, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in keys}
        for layer, stat, chunk, n in rows:
            key = (run_id, layer, stat, chunk)
            with self._cache_lock:
                got = self._chunks.get(key)
                if got is not None:
                    self._chunks.move_to_end(key)
            if got is None:  # evicted meanwhile (a read of more than the cache holds)
                got = (n, *_read_chunk(conn, key))
            out[layer, stat].append((got[1], got[2]))
        return out

    def _keep(self, key: tuple[str, str, str, int], n: int, steps: np.ndarray,
              vals: np.ndarray) -> None:  # fmt: skip
        with self._cache_lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._chunk_bytes -= old[1].nbytes + old[2].nbytes
            self._chunks[key] = (n, steps, vals)
            self._chunk_bytes += steps.nbytes + vals.nbytes
            while self._chunk_bytes > CHUNK_CACHE_BYTES and len(self._chunks) > 1:
                _, (_, s, v) = self._chunks.popitem(last=False)
                self._chunk_bytes -= s.nbytes + v.nbytes

    # -- pending batches ----------------------------------------------------------------------

    def _pending(self, conn: sa.Connection, run_id: str) -> list[_Pending]:
        """The run's pending batches, oldest first (read before the folded rows: a fold in
        between leaves a batch in both places, never in neither)."""
        keys = [
            (i, run_id, t)
            for i, t in conn.execute(
                sa.select(pending.c.id, pending.c.created_at)
                .where(pending.c.run_id == run_id)
                .order_by(pending.c.id)
            )
        ]
        new = [k[0] for k in keys if k not in self._decoded]
        if new:
            rows = conn.execute(
                sa.select(pending.c.id, pending.c.created_at, pending.c.body).where(
                    pending.c.id.in_(new)
                )
            )
            for i, t, body in rows:
                self._decoded[i, run_id, t] = _Pending.of(body)
        out = [self._decoded[k] for k in keys if k in self._decoded]
        if len(self._decoded) > 4096:  # folded batches: forget them
            live = set(keys)
            self._decoded = {k: b for k, b in self._decoded.items() if k in live}
        return out

    def _pending_series(
        self, conn: sa.Connection, run_id: str, wanted: set[Key] | None = None
    ) -> dict[Key, Series]:
        """The pending values of the ``wanted`` series (default: all), by series."""
        parts: dict[Key, list[Series]] = {}
        for batch in self._pending(conn, run_id):
            for key in batch.series.keys() if wanted is None else wanted & batch.series.keys():
                parts.setdefault(key, []).append(batch.series[key])
        return {
            k: (np.concatenate([s for s, _ in v]), np.concatenate([x for _, x in v]))
            for k, v in parts.items()
        }

    def _pending_channels(self, conn: sa.Connection, run_id: str) -> list[dict[str, Any]]:
        tables = [b.channels for b in self._pending(conn, run_id) if b.channels]
        table = channel_table(tables)
        if not table:
            return []
        return [
            {
                "layer": str(layer),
                "step": int(step),
                **{c: np.asarray(table[c][i], np.float32) for c in CHANNEL_COLUMNS},
            }
            for i, (step, layer) in enumerate(zip(table["step"], table["layer"], strict=True))
        ]

    # -- series -------------------------------------------------------------------------------

    def many(
        self,
        run_id: str,
        keys: Iterable[Key],
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> dict[Key, Series]:
        """Whole series (or their part within [step_min, step_max]), in step order."""
        keys = list(keys)
        lo = None if step_min is None else step_min // CHUNK
        hi = None if step_max is None else step_max // CHUNK
        with self.engine.connect() as conn:
            waiting = self._pending_series(conn, run_id, set(keys))
            parts = self._series_chunks(conn, run_id, keys, lo, hi)
        out = {}
        for key, chunks in parts.items():
            stored = (
                (
                    np.concatenate([s for s, _ in chunks]),
                    np.concatenate([v for _, v in chunks]),
                )
                if chunks
                else _empty()
            )
            steps, vals = _merge(stored, waiting.get(key))
            keep = np.ones(len(steps), bool)
            if step_min is not None:
                keep &= steps >= step_min
            if step_max is not None:
                keep &= steps <= step_max
            out[key] = (steps[keep], vals[keep])
        return out

    def one(
        self,
        run_id: str,
        layer: str,
        stat: str,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> Series:
        """(steps, values) of one series, in step order, within [step_min, step_max]."""
        return self.many(run_id, [(layer, stat)], step_min, step_max)[layer, stat]

    def coarse(self, run_id: str, keys: Iterable[Key]) -> dict[Key, tuple[np.ndarray, np.ndarray]]:
        """Several series at COARSE-step resolution: {(layer, stat): (bin centres, means)}."""
        keys = list(keys)
        q = _chunks(run_id, keys, series.c.chunk, series.c.coarse).order_by(
            series.c.layer, series.c.stat, series.c.chunk
        )
        centres = np.arange(CHUNK // COARSE) * COARSE + COARSE / 2
        parts: dict[Key, dict[int, np.ndarray]] = {k: {} for k in keys}
        with self.engine.connect() as conn:
            waiting = self._pending_series(conn, run_id, set(keys))
            for layer, stat, chunk, means in conn.execute(q):
                if (layer, stat) not in parts:
                    continue
                if means is None:  # a chunk written before migration 0002
                    means = coarse_bins(*_read_chunk(conn, (run_id, layer, stat, chunk)), chunk)
                parts[layer, stat][chunk] = np.frombuffer(means, np.float32)
            for key, (steps, vals) in waiting.items():  # chunks still growing: from every value
                if key not in parts:
                    continue
                for chunk in np.unique(steps // CHUNK).tolist():
                    sel = steps // CHUNK == chunk
                    stored = _read_chunk(conn, (run_id, *key, chunk))
                    merged = _merge(stored, (steps[sel], vals[sel]))
                    parts[key][chunk] = coarse_bins(*merged, chunk)
        out = {}
        for key, chunks in parts.items():
            if chunks:
                order = sorted(chunks)
                x = np.concatenate([c * CHUNK + centres for c in order])
                y = np.concatenate([chunks[c] for c in order])
                keep = np.isfinite(y)
                out[key] = (x[keep], y[keep])
            else:
                out[key] = (np.empty(0), np.empty(0, np.float32))
        return out

    def last(self, run_id: str, keys: Iterable[Key]) -> dict[Key, float]:
        """The latest value of several series (NaN where there is none)."""
        keys = list(keys)
        latest = (
            sa.select(series.c.layer, series.c.stat, sa.func.max(series.c.chunk).label("chunk"))
            .where(series.c.run_id == run_id)
            .group_by(series.c.layer, series.c.stat)
            .subquery()
        )
        q = (
            sa.select(series.c.layer, series.c.stat, series.c.vals)
            .join(
                latest,
                sa.and_(
                    series.c.layer == latest.c.layer,
                    series.c.stat == latest.c.stat,
                    series.c.chunk == latest.c.chunk,
                ),
            )
            .where(series.c.run_id == run_id)
        )
        out = dict.fromkeys(keys, float("nan"))
        with self.engine.connect() as conn:
            waiting = self._pending_series(conn, run_id, set(keys))
            for layer, stat, vals in conn.execute(q):
                v = np.frombuffer(vals, np.float32)
                if (layer, stat) in out and len(v):
                    out[layer, stat] = float(v[-1])
        for key, (steps, vals) in waiting.items():  # pending batches are the newest
            if key in out and len(steps):
                out[key] = float(vals[np.argmax(steps)])
        return out

    def names(self, run_id: str) -> list[Key]:
        """The (layer, stat) pairs a run has records of."""
        with self.engine.connect() as conn:
            waiting = {k for batch in self._pending(conn, run_id) for k in batch.series}
            rows = conn.execute(
                sa.select(series.c.layer, series.c.stat).where(series.c.run_id == run_id).distinct()
            ).all()
        return sorted({(r[0], r[1]) for r in rows} | waiting)

    # -- per-channel arrays -------------------------------------------------------------------

    def channels(self, run_id: str, step: int | None = None) -> list[dict[str, Any]]:
        """Per-channel arrays of every layer at ``step`` (default: each layer's latest)."""
        with self.engine.connect() as conn:
            waiting = self._pending_channels(conn, run_id)
            if step is None:
                latest = (
                    sa.select(channels.c.layer, sa.func.max(channels.c.step).label("step"))
                    .where(channels.c.run_id == run_id)
                    .group_by(channels.c.layer)
                    .subquery()
                )
                q = (
                    channels.select()
                    .join(
                        latest,
                        sa.and_(
                            channels.c.layer == latest.c.layer, channels.c.step == latest.c.step
                        ),
                    )
                    .where(channels.c.run_id == run_id)
                )
            else:
                q = channels.select().where(channels.c.run_id == run_id, channels.c.step == step)
            rows = conn.execute(q).mappings().all()
        found: dict[tuple[str, int], dict[str, Any]] = {}
        for r in rows:
            flat = np.frombuffer(r["vals"], np.float32)
            if r["c"] < 1 or flat.size != len(CHANNEL_COLUMNS) * r["c"]:
                continue  # a row not as written (never by this store): left out, not a 500
            arr = flat.reshape(len(CHANNEL_COLUMNS), r["c"])
            found[r["layer"], r["step"]] = {
                "layer": r["layer"],
                "step": r["step"],
                **{col: arr[i] for i, col in enumerate(CHANNEL_COLUMNS)},
            }
        for row in waiting:
            if step is None or row["step"] == step:
                found[row["layer"], row["step"]] = row
        if step is None:  # each layer's latest of both
            best: dict[str, dict[str, Any]] = {}
            for row in found.values():
                if row["layer"] not in best or row["step"] > best[row["layer"]]["step"]:
                    best[row["layer"]] = row
            out = list(best.values())
        else:
            out = list(found.values())
        return sorted(out, key=lambda d: _layer_order(d["layer"]))

    def channel_steps(self, run_id: str) -> list[int]:
        """The steps with per-channel arrays kept, in order."""
        with self.engine.connect() as conn:
            waiting = self._pending_channels(conn, run_id)
            stored = conn.execute(
                sa.select(channels.c.step).where(channels.c.run_id == run_id).distinct()
            ).scalars()
            return sorted(set(stored) | {r["step"] for r in waiting})

    # -- whole tables -------------------------------------------------------------------------

    def table(self, run_id: str, name: str) -> Table:
        """One records table (bncore.record.tables) rebuilt from the stored series: for an
        export, or the BN doctor reading a run again."""
        if name == "channels":
            return self._channel_table(run_id)
        names = self.names(run_id)
        if name in ("steps", "evals"):
            wanted = STEP_COLUMNS if name == "steps" else (*EVAL_COLUMNS, *OPTIONAL_EVAL_COLUMNS)
            return self._aligned(run_id, [("", s) for s in wanted if ("", s) in names])
        names = [(lay, s) for lay, s in names if lay and _table_of(s) == name]
        parts = []
        for layer in dict.fromkeys(layer for layer, _ in names):
            cols = self._aligned(run_id, [(lay, s) for lay, s in names if lay == layer])
            parts.append({"layer": np.full(len(cols.get("step", ())), layer), **cols})
        if not parts:
            return {}
        keys = list(parts[0])
        merged = {
            k: np.concatenate([p.get(k, np.full(len(p["step"]), np.nan)) for p in parts])
            for k in keys
        }
        order = np.lexsort((np.arange(len(merged["step"])), merged["step"]))
        return {
            "step": merged["step"][order],
            "layer": merged["layer"][order],
            **{k: v[order] for k, v in merged.items() if k not in ("step", "layer")},
        }

    def _aligned(self, run_id: str, keys: list[Key]) -> dict[str, np.ndarray]:
        """Series as columns on the steps of the first (NaN where one has no value)."""
        if not keys:
            return {}
        data = self.many(run_id, keys)
        first_steps = data[keys[0]][0]
        out: dict[str, np.ndarray] = {"step": first_steps}
        for key in keys:
            steps, vals = data[key]
            col = np.full(len(first_steps), np.nan, np.float32)
            pos = np.searchsorted(first_steps, steps)
            ok = (pos < len(first_steps)) & (
                first_steps[np.minimum(pos, len(first_steps) - 1)] == steps
            )
            col[pos[ok]] = vals[ok]
            out[key[1]] = col
        return out

    def _channel_table(self, run_id: str) -> Table:
        """Every kept per-channel row of the run, by step (layers in their order within a
        step), in one read: ragged where layers differ in width."""
        with self.engine.connect() as conn:
            waiting = self._pending_channels(conn, run_id)
            rows = (
                conn.execute(channels.select().where(channels.c.run_id == run_id)).mappings().all()
            )
        found: dict[tuple[str, int], dict[str, Any]] = {}
        for r in rows:
            flat = np.frombuffer(r["vals"], np.float32)
            if r["c"] < 1 or flat.size != len(CHANNEL_COLUMNS) * r["c"]:
                continue  # a row not as written (never by this store)
            arr = flat.reshape(len(CHANNEL_COLUMNS), r["c"])
            found[r["layer"], r["step"]] = {
                "layer": r["layer"], "step": r["step"],
                **{col: arr[i] for i, col in enumerate(CHANNEL_COLUMNS)},
            }  # fmt: skip
        for row in waiting:
            found[row["layer"], row["step"]] = row
        ordered = sorted(found.values(), key=lambda d: (d["step"], _layer_order(d["layer"])))
        out: Table = {
            "step": np.array([r["step"] for r in ordered], np.int64),
            "layer": np.array([r["layer"] for r in ordered]),
        }
        for col in CHANNEL_COLUMNS:  # ragged where layers differ in width
            out[col] = channel_column([r[col] for r in ordered]) if ordered else np.empty((0, 0))
        return out


def _table_of(stat: str) -> str:
    """The records table a stored statistic belongs to."""
    found = statistics.lookup(stat)
    return found.table if found is not None else ""


def _chunks(run_id: str, keys: list[Key], *columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """The chunk rows of these series: (layer, stat, *columns)."""
    return sa.select(series.c.layer, series.c.stat, *columns).where(
        series.c.run_id == run_id,
        series.c.layer.in_(sorted({lay for lay, _ in keys})),
        series.c.stat.in_(sorted({s for _, s in keys})),
    )


def _merge(stored: Series, waiting: Series | None) -> Series:
    """Folded and pending values of one series, by step (a step in both: the folded one)."""
    if waiting is None or not len(waiting[0]):
        return stored
    steps = np.concatenate([stored[0], waiting[0]])
    vals = np.concatenate([stored[1], waiting[1].astype(np.float32, copy=False)])
    steps, first = np.unique(steps, return_index=True)
    return steps, vals[first]


def _layer_order(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else -1, name)

"""The store: runs, sweeps and their records in a SQL database (SQLite by default, in WAL mode).

Records are kept by series, one per (run, layer, stat), in chunks of ``CHUNK`` steps: each chunk
is a row holding its steps (int64) and values (float32) as blobs, so a 100k-step series is a few
dozen rows to read. Global series (loss, learning rate, evaluations) have the layer ``""``.
Per-channel arrays are kept per (run, layer, step). The schema is created and upgraded by the
Alembic migrations in ``server/migrations``; everything here is SQLAlchemy Core, so a PostgreSQL
URL works too.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from bncore.records import CHANNEL_COLUMNS, channel_column, channel_table

CHUNK = 4096  # steps per stored chunk of a series
COARSE = 64  # steps per bin of a chunk's coarse copy (CHUNK // COARSE bins)
FOLD_BATCHES = 64  # pending batches of a run folded into its chunks at once, at most...
FOLD_SECONDS = 1.0  # ...or once the oldest waited this long (and before any read)
ACTIVE = ("queued", "running")
FINISHED = ("completed", "diverged", "failed", "cancelled", "interrupted")

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
    sa.Column("steps_done", sa.Integer, nullable=False, default=0),
    sa.Column("pid", sa.Integer),
    sa.Column("seq", sa.Integer, nullable=False, default=0),
    sa.Column("client_seq", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
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
    sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("layer", sa.String(64), primary_key=True),
    sa.Column("stat", sa.String(64), primary_key=True),
    sa.Column("chunk", sa.Integer, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("steps", sa.LargeBinary, nullable=False),
    sa.Column("vals", sa.LargeBinary, nullable=False),
    sa.Column("coarse", sa.LargeBinary),  # float32 means of COARSE-step bins (migration 0002)
)  # fmt: skip
channels = sa.Table(
    "channels", metadata,
    sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("layer", sa.String(64), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("c", sa.Integer, nullable=False),
    sa.Column("vals", sa.LargeBinary, nullable=False),
)  # fmt: skip

pending = sa.Table(
    "pending", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("body", sa.LargeBinary, nullable=False),  # a batch, as _pack writes it
    sa.Column("created_at", sa.Float, nullable=False),
)  # fmt: skip

JSON_FIELDS = ("config", "meta", "final")


class Store:
    """All database access; one writer at a time, readers alongside (WAL).

    A batch of records is stored as it comes, in one row of ``pending``, and acknowledged;
    batches are folded into the per-(layer, statistic) chunks of ``series`` every
    FOLD_BATCHES batches or FOLD_SECONDS, and before anything reads the run. So the cost of
    updating hundreds of series is paid once a second, not at every batch.
    """

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write = threading.Lock()
        self._open: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.migrate()
        # run id -> [time of its oldest pending batch, pending batches]
        with self.engine.connect() as conn:
            self._pending: dict[str, list[float]] = {
                r[0]: [r[1], r[2]]
                for r in conn.execute(
                    sa.select(
                        pending.c.run_id, sa.func.min(pending.c.created_at), sa.func.count()
                    ).group_by(pending.c.run_id)
                )
            }

    def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
        with self._write, self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    # -- runs -------------------------------------------------------------------------------

    def create_run(self, **fields: Any) -> dict[str, Any]:
        row = {"steps_done": 0, "seq": 0, "client_seq": 0, "created_at": time.time(), **fields}
        with self._write, self.engine.begin() as conn:
            conn.execute(runs.insert().values(**_dump(row)))
        return self.get_run(row["id"]) or {}

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(runs.select().where(runs.c.id == run_id)).mappings().first()
        return _load(row) if row else None

    def list_runs(
        self,
        status: str | None = None,
        sweep_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        query = runs.select()
        count = sa.select(sa.func.count()).select_from(runs)
        for col, value in ((runs.c.status, status), (runs.c.sweep_id, sweep_id)):
            if value is not None:
                query, count = query.where(col == value), count.where(col == value)
        query = query.order_by(runs.c.created_at.desc(), runs.c.id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
            total = conn.execute(count).scalar_one()
        return [_load(r) for r in rows], total

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self._write, self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(**_dump(fields)))

    def finish_run(self, run_id: str, status: str, **fields: Any) -> bool:
        """Set a final status unless the run already has one; True if this call set it."""
        with self._write, self.engine.begin() as conn:
            done = conn.execute(
                runs.update()
                .where(runs.c.id == run_id, runs.c.status.in_(ACTIVE))
                .values(status=status, finished_at=time.time(), pid=None, **_dump(fields))
            ).rowcount
            self._fold(conn, run_id)
        self._drop_open(run_id)
        return bool(done)

    def delete_run(self, run_id: str) -> None:
        with self._write, self.engine.begin() as conn:
            conn.execute(pending.delete().where(pending.c.run_id == run_id))
            self._pending.pop(run_id, None)
            conn.execute(series.delete().where(series.c.run_id == run_id))
            conn.execute(channels.delete().where(channels.c.run_id == run_id))
            conn.execute(runs.delete().where(runs.c.id == run_id))
        self._drop_open(run_id)

    def recover(self) -> list[str]:
        """At start: runs left running by a dead server become 'interrupted'; the queued ids
        are returned, oldest first, to be queued again."""
        with self._write, self.engine.begin() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.status == "running")
                .values(
                    status="interrupted",
                    pid=None,
                    finished_at=time.time(),
                    message="the server stopped while this run was training; the records it "
                    "had acknowledged are kept",
                )
            )
            queued = (
                conn.execute(
                    sa.select(runs.c.id)
                    .where(runs.c.status == "queued")
                    .order_by(runs.c.created_at)
                )
                .scalars()
                .all()
            )
        return list(queued)

    # -- sweeps -----------------------------------------------------------------------------

    def create_sweep(
        self, sweep_id: str, name: str | None, base: dict, grid: dict, experiment: str | None = None
    ) -> None:
        with self._write, self.engine.begin() as conn:
            conn.execute(
                sweeps.insert().values(
                    id=sweep_id,
                    name=name,
                    base=json.dumps(base),
                    grid=json.dumps(grid),
                    created_at=time.time(),
                    experiment=experiment,
                )
            )

    def list_sweeps(self, experiments_only: bool = False, limit: int = 200) -> list[dict]:
        """Sweeps, newest first: id, name, experiment, created_at."""
        q = sa.select(sweeps.c.id, sweeps.c.name, sweeps.c.experiment, sweeps.c.created_at)
        if experiments_only:
            q = q.where(sweeps.c.experiment.is_not(None))
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(sweeps.c.created_at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def get_sweep(self, sweep_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sweeps.select().where(sweeps.c.id == sweep_id)).mappings().first()
        if row is None:
            return None
        out = dict(row)
        out["base"], out["grid"] = json.loads(out["base"]), json.loads(out["grid"])
        return out

    # -- records ----------------------------------------------------------------------------

    def append(
        self,
        run_id: str,
        batch: dict[str, dict[str, np.ndarray]],
        client_seq: int | None,
    ) -> tuple[int, bool]:
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
            conn.execute(pending.insert().values(run_id=run_id, body=_pack(batch), created_at=now))
            waiting = self._pending.setdefault(run_id, [now, 0])
            waiting[1] += 1
            if waiting[1] >= FOLD_BATCHES or now - waiting[0] >= FOLD_SECONDS:
                self._fold(conn, run_id)
            steps = batch.get("steps") or {}
            if len(steps.get("step", ())):
                steps_done = max(steps_done, int(np.max(steps["step"])))
            values = {"seq": seq + 1, "steps_done": steps_done}
            if client_seq is not None:
                values["client_seq"] = client_seq
            conn.execute(runs.update().where(runs.c.id == run_id).values(**values))
        return seq + 1, True

    def fold(self, run_id: str) -> None:
        """Fold the run's pending batches into its series and channels (before reading them)."""
        if run_id in self._pending:
            with self._write, self.engine.begin() as conn:
                self._fold(conn, run_id)

    def _fold(self, conn: sa.Connection, run_id: str) -> None:
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
        batches = [_unpack(r[1]) for r in rows]
        for name in dict.fromkeys(t for b in batches for t in b):
            tables = [b[name] for b in batches if name in b]
            # runs of tables with the same columns, in order: a column stays absent where absent
            for _, same in itertools.groupby(tables, key=tuple):
                parts = list(same)
                if name == "channels":  # layers of several widths: ragged rows
                    chan += _channel_rows(run_id, channel_table(parts))
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

    def _chunks(self, run_id: str, batch: dict[str, dict[str, np.ndarray]], conn):
        """Series chunk rows with this batch appended (the open chunks are kept in memory)."""
        for layer, stat, steps, vals in _series_of(batch):
            chunk_of = steps // CHUNK
            for chunk in np.unique(chunk_of):
                sel = chunk_of == chunk
                key = (run_id, layer, stat, int(chunk))
                old = self._open.get(key)
                if old is None:
                    old = self._read_chunk(conn, key)
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

    @staticmethod
    def _read_chunk(conn, key: tuple[str, str, str, int]) -> tuple[np.ndarray, np.ndarray]:
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

    def _drop_open(self, run_id: str) -> None:
        for key in [k for k in self._open if k[0] == run_id]:
            del self._open[key]

    def read_series(
        self,
        run_id: str,
        layer: str,
        stat: str,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one series, in step order, within [step_min, step_max]."""
        self.fold(run_id)
        q = sa.select(series.c.steps, series.c.vals).where(
            series.c.run_id == run_id, series.c.layer == layer, series.c.stat == stat
        )
        if step_min is not None:
            q = q.where(series.c.chunk >= step_min // CHUNK)
        if step_max is not None:
            q = q.where(series.c.chunk <= step_max // CHUNK)
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(series.c.chunk)).all()
        if not rows:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        steps = np.concatenate([np.frombuffer(r[0], np.int64) for r in rows])
        vals = np.concatenate([np.frombuffer(r[1], np.float32) for r in rows])
        keep = np.ones(len(steps), bool)
        if step_min is not None:
            keep &= steps >= step_min
        if step_max is not None:
            keep &= steps <= step_max
        return steps[keep], vals[keep]

    def read_many(
        self, run_id: str, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
        """Several whole series in one query: {(layer, stat): (steps, values)}."""
        self.fold(run_id)
        layers = sorted({lay for lay, _ in keys})
        stats = sorted({s for _, s in keys})
        q = (
            sa.select(series.c.layer, series.c.stat, series.c.steps, series.c.vals)
            .where(series.c.run_id == run_id, series.c.layer.in_(layers), series.c.stat.in_(stats))
            .order_by(series.c.layer, series.c.stat, series.c.chunk)
        )
        parts: dict[tuple[str, str], list] = {k: [] for k in keys}
        with self.engine.connect() as conn:
            for layer, stat, steps, vals in conn.execute(q):
                if (layer, stat) in parts:
                    parts[layer, stat].append((steps, vals))
        out = {}
        for key, chunks in parts.items():
            if chunks:
                out[key] = (
                    np.concatenate([np.frombuffer(s, np.int64) for s, _ in chunks]),
                    np.concatenate([np.frombuffer(v, np.float32) for _, v in chunks]),
                )
            else:
                out[key] = (np.empty(0, np.int64), np.empty(0, np.float32))
        return out

    def read_coarse(
        self, run_id: str, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
        """Several series at COARSE-step resolution: {(layer, stat): (bin centres, means)}."""
        self.fold(run_id)
        layers = sorted({lay for lay, _ in keys})
        stats = sorted({s for _, s in keys})
        q = (
            sa.select(
                series.c.layer,
                series.c.stat,
                series.c.chunk,
                series.c.coarse,
                series.c.steps,
                series.c.vals,
            )
            .where(series.c.run_id == run_id, series.c.layer.in_(layers), series.c.stat.in_(stats))
            .order_by(series.c.layer, series.c.stat, series.c.chunk)
        )
        parts: dict[tuple[str, str], list] = {k: [] for k in keys}
        centres = np.arange(CHUNK // COARSE) * COARSE + COARSE / 2
        with self.engine.connect() as conn:
            for layer, stat, chunk, coarse, steps, vals in conn.execute(q):
                if (layer, stat) not in parts:
                    continue
                means = (
                    np.frombuffer(coarse, np.float32)
                    if coarse is not None
                    else coarse_bins(
                        np.frombuffer(steps, np.int64), np.frombuffer(vals, np.float32), chunk
                    )
                )
                parts[layer, stat].append((chunk * CHUNK + centres, means))
        out = {}
        for key, chunks in parts.items():
            if chunks:
                x = np.concatenate([c for c, _ in chunks])
                y = np.concatenate([m for _, m in chunks])
                keep = np.isfinite(y)
                out[key] = (x[keep], y[keep])
            else:
                out[key] = (np.empty(0), np.empty(0, np.float32))
        return out

    def read_last(self, run_id: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """The latest value of several series (NaN where there is none)."""
        self.fold(run_id)
        last = (
            sa.select(series.c.layer, series.c.stat, sa.func.max(series.c.chunk).label("chunk"))
            .where(series.c.run_id == run_id)
            .group_by(series.c.layer, series.c.stat)
            .subquery()
        )
        q = (
            sa.select(series.c.layer, series.c.stat, series.c.vals)
            .join(
                last,
                sa.and_(
                    series.c.layer == last.c.layer,
                    series.c.stat == last.c.stat,
                    series.c.chunk == last.c.chunk,
                ),
            )
            .where(series.c.run_id == run_id)
        )
        wanted = set(keys)
        out = dict.fromkeys(keys, float("nan"))
        with self.engine.connect() as conn:
            for layer, stat, vals in conn.execute(q):
                if (layer, stat) in wanted:
                    v = np.frombuffer(vals, np.float32)
                    out[layer, stat] = float(v[-1]) if len(v) else float("nan")
        return out

    def series_names(self, run_id: str) -> list[tuple[str, str]]:
        """The (layer, stat) pairs a run has records of."""
        self.fold(run_id)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(series.c.layer, series.c.stat).where(series.c.run_id == run_id).distinct()
            ).all()
        return sorted((r[0], r[1]) for r in rows)

    def read_channels(self, run_id: str, step: int | None = None) -> list[dict[str, Any]]:
        """Per-channel arrays of every layer at ``step`` (default: each layer's latest)."""
        self.fold(run_id)
        with self.engine.connect() as conn:
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
        out = []
        for r in rows:
            arr = np.frombuffer(r["vals"], np.float32).reshape(len(CHANNEL_COLUMNS), r["c"])
            out.append(
                {
                    "layer": r["layer"],
                    "step": r["step"],
                    **{col: arr[i] for i, col in enumerate(CHANNEL_COLUMNS)},
                }
            )
        return sorted(out, key=lambda d: _layer_order(d["layer"]))

    def channel_steps(self, run_id: str) -> list[int]:
        self.fold(run_id)
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(channels.c.step)
                    .where(channels.c.run_id == run_id)
                    .distinct()
                    .order_by(channels.c.step)
                ).scalars()
            )


def coarse_bins(steps: np.ndarray, vals: np.ndarray, chunk: int) -> np.ndarray:
    """Means of the chunk's COARSE-step bins (NaN where a bin has no finite value)."""
    idx = (steps - chunk * CHUNK) // COARSE
    ok = np.isfinite(vals)
    n = CHUNK // COARSE
    total = np.bincount(idx[ok], vals[ok].astype(np.float64), minlength=n)[:n]
    count = np.bincount(idx[ok], minlength=n)[:n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _layer_order(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else -1, name)


def _series_of(
    batch: dict[str, dict[str, np.ndarray]],
) -> Iterable[tuple[str, str, np.ndarray, np.ndarray]]:
    """(layer, stat, steps, values) for every series in a batch."""
    for table in ("steps", "evals"):
        t = batch.get(table) or {}
        if not len(t.get("step", ())):
            continue
        steps = np.asarray(t["step"], np.int64)
        for stat, vals in t.items():
            if stat != "step":
                yield "", stat, steps, np.asarray(vals, np.float32)
    t = batch.get("layers") or {}
    if len(t.get("step", ())):
        steps, names = np.asarray(t["step"], np.int64), np.asarray(t["layer"])
        for layer in dict.fromkeys(names.tolist()):
            sel = names == layer
            for stat, vals in t.items():
                if stat not in ("step", "layer"):
                    yield str(layer), stat, steps[sel], np.asarray(vals, np.float32)[sel]


def _pack(batch: dict[str, dict[str, np.ndarray]]) -> bytes:
    """A batch as bytes: a JSON index (text columns inline), then the raw numeric arrays."""
    index: list[list[Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for table, cols in batch.items():
        for col, arr in cols.items():
            if arr.dtype == object and len(arr) and isinstance(arr[0], np.ndarray):
                lengths = [len(r) for r in arr]  # ragged per-channel rows: flat, with lengths
                a = np.concatenate(arr).astype(np.float32)
                index.append([table, col, "ragged", lengths, offset])
                blobs.append(a.tobytes())
                offset += a.nbytes
                continue
            if arr.dtype.kind in "UO":
                index.append([table, col, "text", arr.tolist()])
                continue
            a = np.ascontiguousarray(arr)
            index.append([table, col, a.dtype.str, list(a.shape), offset])
            blobs.append(a.tobytes())
            offset += a.nbytes
    head = orjson.dumps(index)
    return len(head).to_bytes(4, "little") + head + b"".join(blobs)


def _unpack(data: bytes) -> dict[str, dict[str, np.ndarray]]:
    n = int.from_bytes(data[:4], "little")
    body = memoryview(data)[4 + n :]
    batch: dict[str, dict[str, np.ndarray]] = {}
    for table, col, dtype, *rest in orjson.loads(data[4 : 4 + n]):
        if dtype == "text":
            arr = np.asarray(rest[0], dtype=str)
        elif dtype == "ragged":
            lengths, offset = rest
            flat = np.frombuffer(body, np.float32, int(sum(lengths)), offset)
            arr = channel_column(np.split(flat, np.cumsum(lengths)[:-1]))
        else:
            shape, offset = rest
            arr = np.frombuffer(body, np.dtype(dtype), int(np.prod(shape)), offset).reshape(shape)
        batch.setdefault(table, {})[col] = arr
    return batch


def _channel_rows(run_id: str, table: dict[str, np.ndarray]) -> Iterable[dict[str, Any]]:
    if not len(table.get("step", ())):
        return
    for i, (step, layer) in enumerate(zip(table["step"], table["layer"], strict=True)):
        arr = np.stack([np.asarray(table[c][i], np.float32) for c in CHANNEL_COLUMNS])
        yield {
            "run_id": run_id,
            "layer": str(layer),
            "step": int(step),
            "c": arr.shape[1],
            "vals": arr.tobytes(),
        }


def _upsert(engine: sa.Engine, table: sa.Table, update: tuple[str, ...]):
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(table)
    return stmt.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key.columns],
        set_={c: stmt.excluded[c] for c in update},
    )


def _dump(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (json.dumps(v) if k in JSON_FIELDS and v is not None else v) for k, v in fields.items()
    }


def _load(row) -> dict[str, Any]:
    out = dict(row)
    for k in JSON_FIELDS:
        out[k] = json.loads(out[k]) if out.get(k) else None
    return out


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable when the process dies
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()

"""The wire format of a batch of records (``POST /api/runs/{id}/records``): a JSON object of
bncore.record.tables tables, each a mapping of equal-length columns: ``{"seq": 7, "steps": {"step":
[...], "loss": [...]}, "layers": {"step": [...], "layer": [...], "pre_var": [...]}, "channels":
{...}, "evals": {...}}``; null stands for NaN. ``seq`` (optional, increasing per run) makes a
retried send harmless. Checked here into numpy columns, and cut down for live listeners.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import orjson

from bncore import statistics
from bncore.record.tables import (
    CHANNEL_COLUMNS,
    TABLES,
    Batch,
    channel_column,
    channel_widths,
    json_columns,
)
from server.errors import Invalid
from server.store.schema import MAX_INT, MAX_LAYER_NAME

COLUMN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,63}")
#: A layer is named by its module path, as torch names modules (any characters but ".", joined
#: by "."): torchvision's ``trunk_output.block1.block1-0``, a user's ``enc/conv 1``. Only control
#: characters are refused (PostgreSQL's text cannot hold NUL); the length is MAX_LAYER_NAME at most.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_COLUMNS = 128  # columns of one table in a batch (a run's own: about 80 at most)
MAX_LAYERS = 512  # distinct layers in one batch's tables
PER_LAYER = ("layers", "layer_evals", "channels")  # tables with a 'layer' column


def _known(table: str, col: str) -> bool:
    """A column the table holds: its step (and layer), or one of its statistics."""
    if col == "step" or (col == "layer" and table in PER_LAYER):
        return True
    if table == "channels":
        return col in CHANNEL_COLUMNS
    found = statistics.lookup(col)
    return found is not None and found.table == table


def parse_batch(body: bytes) -> tuple[Batch, int | None]:
    """Checked, as numpy columns; a 422 that says what is wrong otherwise."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Invalid(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Invalid("the body must be a JSON object of tables")
    unknown = set(data) - {*TABLES, "seq"}
    if unknown:
        raise Invalid(f"unknown keys {sorted(unknown)}; tables are {TABLES} (+ seq)")
    seq = data.get("seq")
    if seq is not None and (
        not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_INT
    ):
        raise Invalid(f"seq must be a positive integer, at most 2**62 = {MAX_INT}", field="seq")
    batch = {}
    for name in TABLES:
        t = data.get(name)
        cols = None if t is None or t == {} else _table(name, t)
        if cols:
            batch[name] = cols
    return batch, seq


def _table(name: str, t: Any) -> dict[str, np.ndarray]:
    """One table of a batch, its columns checked; empty where it has no rows."""
    if not isinstance(t, dict) or "step" not in t:
        raise Invalid(f"{name} must be an object of columns with a 'step' column")
    n = len(t["step"]) if isinstance(t["step"], list) else -1
    if n == 0:
        return {}  # an empty table: nothing to store
    if len(t) > MAX_COLUMNS:
        raise Invalid(
            f"{name} has {len(t)} columns; a table of a batch has at most {MAX_COLUMNS}",
            field=name,
        )
    cols = {col: _column(name, col, values, n) for col, values in t.items()}
    if name in PER_LAYER and "layer" not in cols:
        raise Invalid(f"{name} needs a 'layer' column")
    if name == "channels":
        missing = [c for c in CHANNEL_COLUMNS if c not in cols]
        if missing:
            raise Invalid(
                f"channels needs per-channel columns {list(CHANNEL_COLUMNS)}; "
                f"missing {missing}",
            )  # fmt: skip
        widths = {c: channel_widths({"pre_mean": cols[c]}).tolist() for c in CHANNEL_COLUMNS}
        if len({tuple(w) for w in widths.values()}) > 1:
            raise Invalid(
                "channels: each row's per-channel columns must all have the layer's "
                "channel count",
            )  # fmt: skip
    elif any(v.ndim != 1 for v in cols.values()):
        raise Invalid(f"{name}: columns are flat lists of numbers")
    _once_each(name, cols)
    return cols


def _once_each(name: str, cols: dict[str, np.ndarray]) -> None:
    """Each step (of each layer, in a per-layer table) is one row of a batch: a step repeated
    would be stored as several points at one step."""
    steps = cols["step"]
    layers = np.unique(cols["layer"], return_inverse=True)[1] if "layer" in cols else None
    order = np.lexsort((steps,) if layers is None else (layers, steps))
    same = steps[order][1:] == steps[order][:-1]
    if layers is not None:
        same &= layers[order][1:] == layers[order][:-1]
    if same.any():
        i = order[1:][same][0]
        of = f" of layer {str(cols['layer'][i])[:80]!r}" if layers is not None else ""
        raise Invalid(
            f"{name}: step {int(steps[i])}{of} is in {int(same.sum()) + 1} rows or more of this "
            "batch; each step is one row: send its values together, once",
            field=f"{name}.step",
        )


def _column(table: str, col: str, values: Any, n: int) -> np.ndarray:
    """One column of a table of ``n`` rows, checked."""
    where = f"{table}.{col}"
    if not COLUMN_NAME.fullmatch(col):
        raise Invalid(
            f"{where[:80]}: column names are 1 to 64 letters, digits, _ and .",
            field=table,
        )
    if not _known(table, col):
        raise Invalid(
            f"{where}: unknown column; the statistics are listed in "
            "docs/statistics.md (bncore.statistics)",
            field=where,
        )
    if not isinstance(values, list) or len(values) != n:
        raise Invalid(f"{where}: every column is a list as long as 'step'")
    try:
        if col == "layer":
            return _layers(values)
        if col == "step":
            return _steps(values)
        if table == "channels" and col in CHANNEL_COLUMNS:
            return _channel_column(values)
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise Invalid(f"{where}: {exc}", field=where) from None


def _layers(values: list[Any]) -> np.ndarray:
    """A layer column: at most MAX_LAYERS names, each a module path of 1 to MAX_LAYER_NAME
    characters without control characters."""
    if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
        raise ValueError("layer names are strings (module paths)")
    values = [str(v) for v in values]
    names = set(values)
    if len(names) > MAX_LAYERS:
        raise ValueError(f"{len(names)} layers; a batch has at most {MAX_LAYERS}")
    for v in names:
        if not 0 < len(v) <= MAX_LAYER_NAME or CONTROL.search(v):
            raise ValueError(
                f"layer name {v[:80]!r}: a module path of 1 to {MAX_LAYER_NAME} characters, "
                "without control characters"
            )
    return np.asarray(values)


def _steps(values: list[Any]) -> np.ndarray:
    """A step column: integers from 0 to MAX_INT (whole floats pass too)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        arr = arr.astype(np.float64)
    elif arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ValueError(f"steps are integers from 0 to 2**62 = {MAX_INT}")
    if len(arr) and (arr.min() < 0 or arr.max() > MAX_INT):
        raise ValueError(f"steps are integers from 0 to 2**62 = {MAX_INT}")
    return arr.astype(np.int64)


def _channel_column(values: list[Any]) -> np.ndarray:
    """Rows of one per-channel column, each a list of the layer's C numbers (null: NaN);
    layers of different widths may share a batch."""
    if any(not isinstance(v, list) or not v for v in values):
        raise ValueError("each row is a non-empty list of per-channel numbers")
    rows = [np.asarray([math.nan if x is None else x for x in v], dtype=np.float64) for v in values]
    if any(r.ndim != 1 for r in rows):
        raise ValueError("each row is a flat list of per-channel numbers")
    return channel_column(rows)


def live_view(batch: Batch) -> dict[str, Any]:
    """What a live listener gets of a batch: everything but per-channel arrays, of which only
    each layer's latest row."""
    out: dict[str, Any] = {k: json_columns(v) for k, v in batch.items() if k != "channels"}
    ch = batch.get("channels")
    if ch:
        last = {str(lay): i for i, lay in enumerate(ch["layer"])}
        idx = np.asarray(sorted(last.values()))
        out["channels"] = json_columns({k: v[idx] for k, v in ch.items()})
    return out

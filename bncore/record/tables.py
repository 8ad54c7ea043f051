"""What a run records, in columns: the format every sink writes and every reader gets.

Five tables, each a dict of equal-length numpy columns (Parquet files in ``bnscope train --out``):
``steps`` (one row per training step), ``layers`` (one row per recorded step and block;
``layer`` is the block's name), ``channels`` (per-channel arrays of shape (rows, C), one row per
kept step and block), ``evals`` (one row per evaluation, in eval mode) and ``layer_evals`` (one
row per evaluation and block, in runs that measure something per block when they evaluate).
Every table has a ``step`` column. What each other column means, its unit and how it is drawn:
the registry in bncore.statistics (docs/statistics.md); the column lists below are read from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bncore.statistics import PERCENTILE, columns

TABLES = ("steps", "layers", "channels", "evals", "layer_evals")

CHANNEL_COLUMNS = columns("channels")

Table = dict[str, np.ndarray]
#: Tables by name: a batch of records as the server takes and stores it.
Batch = dict[str, Table]

STEP_COLUMNS = columns("steps")
EVAL_COLUMNS = columns("evals")
#: Only in runs that ask for them (RunConfig.landscape, RunConfig.ics_interval).
OPTIONAL_EVAL_COLUMNS = columns("evals", optional=True)
#: Only where measured (ics_interval; weight_norm for watched models).
OPTIONAL_LAYER_COLUMNS = columns("layers", optional=True)
LAYER_EVAL_COLUMNS = columns("layer_evals", optional=True)
LAYER_COLUMNS = columns("layers")
PERCENTILE_COLUMN = PERCENTILE


@dataclass
class Records:
    """A batch of rows for each table."""

    steps: Table = field(default_factory=dict)
    layers: Table = field(default_factory=dict)
    channels: Table = field(default_factory=dict)
    evals: Table = field(default_factory=dict)
    layer_evals: Table = field(default_factory=dict)

    def tables(self) -> dict[str, Table]:
        return {name: getattr(self, name) for name in TABLES}

    @staticmethod
    def concat(parts: Sequence[Records]) -> Records:
        out = Records()
        for name in TABLES:
            pieces = [t for p in parts if (t := getattr(p, name))]
            if name == "channels":
                out.channels = channel_table(pieces)
            elif pieces:
                setattr(out, name, _concat_columns(pieces))
        return out


def _concat_columns(pieces: Sequence[Table]) -> Table:
    """Tables one after another; a column that some lack (a script's evaluations, each with
    the metrics it logged) is NaN in their rows."""
    names = list(dict.fromkeys(k for t in pieces for k in t))
    out: Table = {}
    for k in names:
        parts = []
        for t in pieces:
            if k in t:
                parts.append(t[k])
            else:
                parts.append(np.full(len(t["step"]), np.nan, np.float32))
        out[k] = np.concatenate(parts)
    return out


def channel_table(parts: Sequence[Table], by_step: bool = False) -> Table:
    """Concatenate ``channels`` tables. Layers of one width give (rows, C) arrays; layers of
    several widths (a ResNet's 64 to 512) give 1-d object arrays of per-row arrays.
    ``by_step``: order the rows by step (stable: layers stay in order within a step)."""
    parts = [p for p in parts if p and len(p["step"])]
    if not parts:
        return {}
    widths = {p[c].shape[1] if p[c].ndim == 2 else -1 for p in parts for c in CHANNEL_COLUMNS}
    table: Table = {}
    for k in parts[0]:
        if k in CHANNEL_COLUMNS and len(widths) > 1:
            table[k] = channel_column([row for p in parts for row in p[k]])
        else:
            table[k] = np.concatenate([p[k] for p in parts])
    if by_step and len(parts) > 1:
        order = np.argsort(table["step"], kind="stable")
        table = {k: v[order] for k, v in table.items()}
    return table


def channel_column(rows: Sequence[np.ndarray]) -> np.ndarray:
    """One per-channel column from its rows: (rows, C) if they have one width, else ragged."""
    if len({len(r) for r in rows}) <= 1 and rows:
        return np.stack(rows)
    col = np.empty(len(rows), dtype=object)
    col[:] = list(rows)
    return col


def padded(col: np.ndarray) -> np.ndarray:
    """A per-channel column as (rows, max C), NaN past each row's own channels."""
    if col.dtype != object:
        return col
    width = max((len(r) for r in col), default=0)
    out = np.full((len(col), width), np.nan, np.float32)
    for i, r in enumerate(col):
        out[i, : len(r)] = r
    return out


def channel_widths(table: Table) -> np.ndarray:
    """The channel count of each row of a ``channels`` table (ragged or not)."""
    col = table["pre_mean"]
    if col.dtype != object:
        return np.full(len(col), col.shape[1] if col.ndim == 2 else 0)
    return np.asarray([len(r) for r in col], np.int64)


def json_columns(table: Table) -> dict[str, Any]:
    """A table's columns ready for orjson (with OPT_SERIALIZE_NUMPY): text columns as lists,
    ragged per-channel columns as lists of arrays."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if v.dtype == object and len(v) and isinstance(v[0], np.ndarray):
            out[k] = list(v)
        elif v.dtype.kind in "UO":
            out[k] = v.tolist()
        else:
            out[k] = v
    return out

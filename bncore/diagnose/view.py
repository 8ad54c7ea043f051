"""A batch of records as the rules read it: each layer's rows in step order, and the tools to
say "for K logged steps in a row" across batches."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bncore.record.tables import Table

__all__ = ["RecordsView", "sustained"]


def _by_layer(table: Table) -> dict[str, Table]:
    """A table's rows per ``layer`` (in order of first appearance), each in step order."""
    if not table or "layer" not in table or not len(table["layer"]):
        return {}
    names = np.asarray(table["layer"]).astype(str)
    uniq, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    parts = np.split(order, bounds)
    out: dict[str, Table] = {}
    for j in np.argsort(first):  # execution order: who appears first in the batch
        rows = parts[j]
        rows = rows[np.argsort(np.asarray(table["step"])[rows], kind="stable")]
        out[str(uniq[j])] = {k: v[rows] for k, v in table.items() if k != "layer"}
    return out


class RecordsView:
    """One batch of records (tables by name, bncore.record.tables' columns), grouped once for
    every rule: ``layers``, ``channels`` and ``layer_evals`` per layer, ``steps`` and ``evals``
    as they are; ``columns``: every ``table.column`` it has."""

    def __init__(self, tables: Mapping[str, Table]) -> None:
        self.steps: Table = dict(tables.get("steps") or {})
        self.evals: Table = dict(tables.get("evals") or {})
        self.layers = _by_layer(dict(tables.get("layers") or {}))
        self.channels = _by_layer(dict(tables.get("channels") or {}))
        self.layer_evals = _by_layer(dict(tables.get("layer_evals") or {}))
        self.columns = {f"{name}.{col}" for name, t in tables.items() if t for col in t}
        steps = [np.asarray(t["step"]) for t in tables.values() if t and len(t.get("step", []))]
        self.last_step = int(max(s.max() for s in steps)) if steps else None

    def loss_at(self, steps: np.ndarray) -> np.ndarray:
        """The training loss at each of ``steps`` (NaN where this batch has none)."""
        out = np.full(len(steps), np.nan)
        if self.steps and "loss" in self.steps:
            at = {
                int(s): float(v)
                for s, v in zip(self.steps["step"], self.steps["loss"], strict=True)
            }
            out[:] = [at.get(int(s), np.nan) for s in steps]
        return out


def sustained(condition: np.ndarray, length: int, carry: int) -> tuple[int | None, int]:
    """Where a run of True in ``condition`` first reaches ``length`` (counting ``carry`` True
    values just before it, from earlier batches), and the run's length at the end: so that
    "for K logged steps in a row" gives the same answer whether the records come in one batch
    or many."""
    n = len(condition)
    if not n:
        return None, carry
    cond = np.asarray(condition, dtype=bool)
    idx = np.arange(n)
    last_false = np.maximum.accumulate(np.where(cond, -1, idx))
    run = idx - last_false
    run = np.where(last_false == -1, run + carry, run)
    hits = np.nonzero(run >= length)[0]
    return (int(hits[0]) if len(hits) else None), int(run[-1])

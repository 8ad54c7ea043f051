"""The recording core: how a recorded step's per-channel rows become table columns, for both
recorders (bncore's own networks, :mod:`bncore.record.recorder`; any model,
:mod:`bncore.record.watcher`).

A recorder gathers, for each logged step and layer, per-channel rows named as
:data:`bncore.nn.byproducts.RECORD_ROWS` (batch mean and biased variance, activation moments,
running statistics, gamma, beta, their gradients, squared gradient norms). Everything after that
is here, once: which layers share a layout (:func:`layouts`), their rows as (steps, layers, C)
arrays (:func:`layer_rows`), BN's output statistics (:func:`bn_output_rows`), the ``layers``
columns (:func:`layer_columns`), the per-channel ``channels`` rows (:func:`channel_columns`) on the
steps that keep them (:func:`kept`), and the step-major tables (:func:`tables`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from bncore.record.tables import CHANNEL_COLUMNS, Records, Table, channel_table

__all__ = [
    "QUANTILES",
    "SATURATION",
    "LayerGroup",
    "bn_output_rows",
    "channel_columns",
    "kept",
    "layer_columns",
    "layer_rows",
    "layouts",
    "nan_rows",
    "percentiles",
    "tables",
]

#: Activation outputs at rest or saturated, by activation: (at or below lo, at or above hi);
#: None where an activation has no such bound (its saturated share is NaN).
SATURATION: dict[str, tuple[float, float] | None] = {
    "relu": (0.0, math.inf),
    "relu6": (0.0, 6.0),
    "sigmoid": (0.01, 0.99),
    "tanh": (-0.99, 0.99),
    "hardsigmoid": (0.0, 1.0),
    "hardtanh": (-1.0, 1.0),
    "linear": (-math.inf, math.inf),
    "leaky_relu": None,
    "elu": None,
    "gelu": None,
    "silu": None,
    "hardswish": None,
    "mish": None,
}
#: The percentiles of a tracked unit's values (Ioffe & Szegedy's Figure 1: 15th, 50th, 85th).
QUANTILES = (15, 50, 85)


@functools.cache
def nan_rows(rows: int, channels: int, device: torch.device) -> Tensor:
    """A (rows, channels) NaN tensor (rows=0: one row, as a (channels,) vector), made once per
    shape and device: what a recorder writes where a layer has no value. Never written to."""
    shape = (channels,) if rows == 0 else (rows, channels)
    return torch.full(shape, math.nan, device=device)


def kept(first: int, n: int, interval: int) -> np.ndarray:
    """Which of ``n`` logged steps keep per-channel arrays, the first of them being the
    ``first``-th recorded (0-based): every ``interval``-th."""
    return (first + np.arange(n)) % interval == 0


def layouts(keys: Sequence[Hashable]) -> list[list[int]]:
    """The positions of the layers that share each record layout (``keys[i]``: layer i's), in
    order of first appearance: layers of one layout are summarized together."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def layer_rows(
    src: np.ndarray, starts: Sequence[int], names: Sequence[str], channels: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows ``names`` (C values each, consecutive) of the layers whose stretch of each step's
    row in ``src`` (steps, width) begins at ``starts``: by name, each (steps, layers, C), and all
    stacked as (steps, layers, rows, C). Views on ``src`` where the stretches lie evenly one
    after another (a network's repeated blocks), else a copy."""
    width = len(names) * channels
    n, b = len(src), len(starts)
    step = starts[1] - starts[0] if b > 1 else width
    even = step >= width and all(s == starts[0] + i * step for i, s in enumerate(starts))
    if even and starts[0] + b * step <= src.shape[1]:
        block = src[:, starts[0] : starts[0] + b * step].reshape(n, b, step)[..., :width]
    else:
        block = np.stack([src[:, s : s + width] for s in starts], 1)
    stacked = block.reshape(n, b, len(names), channels)
    return dict(zip(names, np.moveaxis(stacked, 2, 0), strict=True)), stacked


def bn_output_rows(
    pre_var: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of a BN layer's training-mode output, as they follow exactly
    from what it normalized with: beta, and gamma^2 var / (var + eps) (no gamma: 1; no beta: 0)."""
    post_var = pre_var / (pre_var + eps)
    if gamma is not None:
        post_var = post_var * np.square(gamma)
    return (beta if beta is not None else np.zeros_like(pre_var)), post_var


def percentiles(values: np.ndarray) -> np.ndarray:
    """:data:`QUANTILES` of the last axis, linearly interpolated (numpy's and torch's default
    method); a sort and a gather, much faster than np.percentile on many short rows."""
    v = np.sort(values, axis=-1)
    pos = np.asarray(QUANTILES) / 100 * (v.shape[-1] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, v.shape[-1] - 1)
    return v[..., lo] + (pos - lo) * (v[..., hi] - v[..., lo])


def layer_columns(
    raw: dict[str, np.ndarray],
    pct: np.ndarray | None = None,
    means: dict[str, np.ndarray] | None = None,
) -> Table:
    """``layers`` columns from per-channel rows with channels last (each (..., C)); ``pct``:
    (..., 3, units), the tracked units' percentiles. Every column comes out shaped like the
    leading dims.

    ``means``: channel averages the caller already has for some rows (one reduction over rows
    stacked in memory costs far less than one per row); the others are computed here.
    """
    known = means or {}

    def mean(name: str) -> np.ndarray:
        return known[name] if name in known else raw[name].mean(-1)

    def norm(a: np.ndarray) -> np.ndarray:
        """L2 norm over channels, in one pass (no squared temporary)."""
        return np.sqrt(np.einsum("...c,...c->...", a, a))

    channels = raw["pre_var"].shape[-1]
    with np.errstate(invalid="ignore"):
        cols: Table = {
            "pre_mean": mean("pre_mean"),
            "pre_mean_abs": np.abs(raw["pre_mean"]).mean(-1),
            "pre_var": mean("pre_var"),
            "pre_var_min": raw["pre_var"].min(-1),
            "pre_var_max": raw["pre_var"].max(-1),
            "post_mean": mean("post_mean"),
            "post_var": mean("post_var"),
            "act_mean": mean("act_mean"),
            "act_var": mean("act_var"),
            "act_saturated": mean("act_lo") + mean("act_hi"),
            "act_dead": (raw["act_lo"] + raw["act_hi"] >= 1.0).mean(-1),
            "running_mean": mean("running_mean"),
            "running_var": mean("running_var"),
            "running_mean_gap": norm(raw["running_mean"] - raw["pre_mean"]) / np.sqrt(channels),
            "running_var_gap": norm(raw["running_var"] - raw["pre_var"]) / np.sqrt(channels),
            "gamma": mean("gamma"),
            "beta": mean("beta"),
            "gamma_grad_norm": norm(raw["gamma_grad"]),
            "beta_grad_norm": norm(raw["beta_grad"]),
            "grad_out_norm": np.sqrt(mean("grad_out_sq") * channels),
            "grad_in_norm": np.sqrt(mean("grad_in_sq") * channels),
        }
    if pct is not None:
        for j in range(pct.shape[-1]):
            for q, name in enumerate(("p15", "p50", "p85")):
                cols[f"{name}_{j}"] = pct[..., q, j]
    return {k: v.astype(np.float32, copy=False) for k, v in cols.items()}


def channel_columns(raw: dict[str, np.ndarray]) -> Table:
    """``channels`` columns (per-channel arrays) from per-channel rows."""
    out = {k: raw[k] for k in CHANNEL_COLUMNS if k in raw}
    out["act_saturated"] = raw["act_lo"] + raw["act_hi"]
    return {k: out[k].astype(np.float32, copy=False) for k in CHANNEL_COLUMNS}


@dataclass
class LayerGroup:
    """Layers of one layout in a batch of logged steps: their positions among the run's layers,
    their per-channel rows by name (each (steps, layers, C)) and their ``layers`` columns
    (each (steps, layers))."""

    index: list[int]
    rows: dict[str, np.ndarray]
    columns: Table = field(default_factory=dict)


def tables(
    steps: np.ndarray, names: Sequence[str], groups: Sequence[LayerGroup], keep: np.ndarray
) -> Records:
    """The ``layers`` table (one row per step and layer, step-major, layers in order) and the
    ``channels`` table (the same order, on the ``keep`` steps) of a batch of logged steps.
    A column that some group lacks is NaN there."""
    n, nl = len(steps), len(names)
    columns: Table = {}
    for g in groups:
        for key, v in g.columns.items():
            columns.setdefault(key, np.full((n, nl), np.nan, np.float32))[:, g.index] = v
    layers: Table = {"step": np.repeat(steps, nl), "layer": np.tile(np.asarray(names), n)}
    layers |= {k: v.reshape(-1) for k, v in columns.items()}
    parts, order = [], []
    k = int(keep.sum())
    if k:
        for g in groups:
            kept_rows = {r: v[keep].reshape(-1, v.shape[-1]) for r, v in g.rows.items()}
            b = len(g.index)
            parts.append({"step": np.repeat(steps[keep], b),
                          "layer": np.tile(np.asarray([names[i] for i in g.index]), k),
                          **channel_columns(kept_rows)})  # fmt: skip
            order.append(np.repeat(np.arange(k) * nl, b) + np.tile(g.index, k))
    channels = channel_table(parts)
    if len(parts) > 1:  # groups interleave: back to step-major, layers in order
        at = np.argsort(np.concatenate(order), kind="stable")
        channels = {key: v[at] for key, v in channels.items()}
    return Records(layers=layers, channels=channels)

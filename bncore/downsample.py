"""Fewer points that still show what a series does: the one downsampler of BN Scope, used by the
API (series sent to a chart), the dashboard (heatmap bins), the store (each chunk's coarse copy)
and the experiments' result panels."""

from __future__ import annotations

import numpy as np


def minmax(steps: np.ndarray, values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of (steps, values): the series is cut into max_points // 2 buckets
    of consecutive points and each keeps its minimum and maximum (in step order), so spikes
    survive however long the run. NaN values (undefined statistics) are kept where a bucket
    has nothing else."""
    n = len(values)
    if n <= max_points:
        return steps, values
    buckets = max(1, max_points // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    width = int(np.max(np.diff(edges)))
    # pad each bucket to the same width, so argmin/argmax run on one (buckets, width) array
    idx = edges[:-1, None] + np.arange(width)[None, :]
    valid = idx < edges[1:, None]
    idx = np.where(valid, idx, edges[:-1, None])
    v = values[idx].astype(np.float64)
    lo = np.where(valid & ~np.isnan(v), v, np.inf).argmin(1)
    hi = np.where(valid & ~np.isnan(v), v, -np.inf).argmax(1)
    rows = np.arange(buckets)
    keep = np.unique(np.concatenate([idx[rows, lo], idx[rows, hi]]))
    return steps[keep], values[keep]


def bin_means(steps: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of the finite values in each step bin ``[edges[i], edges[i+1])`` (the last bin also
    takes what lies past it); NaN where a bin has none."""
    n = len(edges) - 1
    if len(steps) == 0:
        return np.full(n, np.nan)
    idx = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, n - 1)
    ok = np.isfinite(values)
    total = np.bincount(idx[ok], values[ok].astype(np.float64), minlength=n)[:n]
    count = np.bincount(idx[ok], minlength=n)[:n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def measured(
    steps: np.ndarray, values: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """The finite points only (a statistic measured every k steps is NaN between), then at most
    ``max_points`` of them by :func:`minmax`."""
    ok = np.isfinite(values)
    return minmax(steps[ok], values[ok], max_points)

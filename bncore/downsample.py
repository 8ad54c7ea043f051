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
    width = -(-n // max(1, max_points // 2))  # points per bucket, rounded up
    buckets = -(-n // width)
    # one (buckets, width) view; the last bucket padded with NaN, which never wins
    v = np.full(buckets * width, np.nan, dtype=values.dtype)
    v[:n] = values
    v = v.reshape(buckets, width)
    missing = np.isnan(v)
    lo = np.where(missing, np.inf, v).argmin(1)
    hi = np.where(missing, -np.inf, v).argmax(1)
    base = np.arange(buckets) * width
    first, second = base + np.minimum(lo, hi), base + np.maximum(lo, hi)
    keep = np.stack([first, second], 1).ravel()
    keep = keep[np.r_[True, keep[1:] != keep[:-1]]]  # in step order; once where min is max
    keep = np.minimum(keep, n - 1)  # an all-NaN last bucket: its first real point
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

"""Server-side downsampling that keeps what a chart must show: each bucket's extremes."""

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

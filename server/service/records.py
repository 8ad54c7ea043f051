"""A run's records read back for the outside: which layers and statistics it has, series
downsampled for a chart, per-channel arrays, whole tables for export."""

from __future__ import annotations

from typing import Any

import numpy as np

from bncore import statistics
from bncore.downsample import minmax
from server.errors import BadRequest, NotFound
from server.service.runs import RunService
from server.store.reads import Key, Series
from server.store.schema import COARSE


def per_layer(stat: str) -> bool:
    """True for a per-layer statistic, False for a global one; BadRequest for an unknown
    name."""
    found = statistics.lookup(stat)
    if found is None:
        raise BadRequest(statistics.unknown(stat))
    return found.per_layer


#: Series (statistic x layer) one /metrics request may read.
MAX_SERIES = 1024


class RecordService:
    def __init__(self, runs: RunService) -> None:
        self.runs, self.reads = runs, runs.store.reads

    # -- series, whole: for a chart that downsamples them itself (the dashboard) ------------

    def series(self, run_id: str, keys: list[Key]) -> dict[Key, Series]:
        """Every kept (steps, values) of each (layer, statistic), in step order."""
        return self.reads.many(run_id, keys)

    def for_bins(
        self, run_id: str, keys: list[Key], last_step: int, bins: int
    ) -> dict[Key, Series]:
        """Series to be averaged into ``bins`` step bins up to ``last_step``: every value of a
        short run; of a long one, whose bins span more than COARSE steps each, the store's
        means of COARSE-step bins (a few rows to read, not every value)."""
        fine = last_step <= COARSE * bins
        return (self.reads.many if fine else self.reads.coarse)(run_id, keys)

    def last(self, run_id: str, keys: list[Key]) -> dict[Key, float]:
        """The latest value of each series (NaN where it has none)."""
        return self.reads.last(run_id, keys)

    def names(self, run_id: str) -> list[Key]:
        """The (layer, stat) pairs the run has records of."""
        return self.reads.names(run_id)

    def layer_names(self, run: dict[str, Any]) -> list[str]:
        """The run's layers that have records: in its own order (its meta's ``layers``, the
        execution order for a watched model), then as found in its records. As many as are
        stored, whatever the meta lists."""
        found = {lay for lay, _ in self.reads.names(run["id"]) if lay}
        listed = [
            n for n in dict.fromkeys((run.get("meta") or {}).get("layers") or []) if n in found
        ]
        return listed + sorted(found.difference(listed), key=lambda n: (len(n), n))

    def layers(self, run_id: str) -> dict[str, Any]:
        """The run's layers, channels and tracked units, and the statistics it has records of."""
        run = self.runs.get(run_id)
        meta = run.get("meta") or {}
        names = self.reads.names(run_id)
        return {
            "layers": meta.get("layers", sorted({lay for lay, _ in names if lay})),
            "channels": meta.get("channels"),
            "tracked_units": meta.get("tracked_units"),
            "stats": {
                "global": sorted({s for lay, s in names if not lay}),
                "layer": sorted({s for lay, s in names if lay}),
            },
            "channel_steps": self.reads.channel_steps(run_id),
        }

    def metrics(
        self,
        run_id: str,
        stats: list[str],
        layers: list[str] | None,
        step_min: int | None,
        step_max: int | None,
        max_points: int,
    ) -> dict[str, Any]:
        """Series of statistics over steps, at most ``max_points`` per series (each bucket's
        minimum and maximum kept)."""
        run = self.runs.get(run_id)
        stats, layers = list(dict.fromkeys(stats)), list(dict.fromkeys(layers or [])) or None
        if step_min is not None and step_max is not None and step_min > step_max:
            raise BadRequest(f"step_min={step_min} is after step_max={step_max}")
        known = (run.get("meta") or {}).get("layers") or sorted(
            {lay for lay, _ in self.reads.names(run_id) if lay}
        )
        for name in layers or []:
            if name not in known:
                raise BadRequest(f"unknown layer {name!r}; this run has: {', '.join(known)}")
        keys: list[Key] = [
            (lay, s) for s in stats for lay in ((layers or known) if per_layer(s) else [""])
        ]
        if len(keys) > MAX_SERIES:
            raise BadRequest(
                f"{len(stats)} statistics over {len(layers or known)} layers are {len(keys)} "
                f"series; one request reads at most {MAX_SERIES}: ask for fewer stat or layer"
            )
        data = self.reads.many(run_id, keys, step_min, step_max)
        series = []
        for lay, s in keys:
            steps, vals = data[lay, s]
            ds, dv = minmax(steps, vals, max_points)
            series.append(
                {"layer": lay, "stat": s, "steps": ds, "values": dv, "points_total": len(steps)}
            )
        return {"run_id": run_id, "max_points": max_points, "series": series}

    def channels(self, run_id: str, step: int | None) -> dict[str, Any]:
        """Per-channel arrays of every layer at ``step`` (default: the latest kept)."""
        run = self.runs.get(run_id)
        rows = self.reads.channels(run_id, step)
        order = {name: i for i, name in enumerate((run.get("meta") or {}).get("layers") or [])}
        if order:
            rows.sort(key=lambda r: order.get(r["layer"], len(order)))
        if step is not None and not rows:
            raise NotFound(
                f"no per-channel arrays at step {step}; kept steps: "
                f"{self.reads.channel_steps(run_id)[-20:]} (last 20)"
            )
        return {"run_id": run_id, "layers": rows}

    def table(self, run_id: str, name: str) -> dict[str, np.ndarray]:
        """One records table (bncore.record.tables) rebuilt from the stored series."""
        self.runs.get(run_id)
        return self.reads.table(run_id, name)

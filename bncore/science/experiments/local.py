"""An experiment run here, in this process, without a server: its sweep's runs one after the
other, then its result and verdict (``bnscope experiment KEY``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from bncore.diagnose import Diagnosis, diagnose
from bncore.record.sinks import MemorySink
from bncore.record.tables import Records
from bncore.run.config import get_field, parse_config
from bncore.run.distributed import train_replicas
from bncore.run.engine import RunResult, train
from bncore.run.sweep import grid_points, point_config
from bncore.science.experiments.framework import Experiment, Point, result

__all__ = ["configs", "point", "points", "run"]


def configs(
    exp: Experiment,
    size: Literal["quick", "full"] = "quick",
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The run configs of the experiment's sweep, in grid order."""
    sweep = exp.sweep(size, overrides)
    points = sweep.get("points") or grid_points(sweep.get("grid") or {})
    return [point_config(sweep["base"], point) for point in points]


def point(
    exp: Experiment,
    config: dict[str, Any],
    records: Records,
    diagnoses: list[Diagnosis] | None = None,
) -> Point:
    """One run of the experiment, as :func:`~bncore.science.experiments.framework.result`
    reads it, with the BN doctor's ``diagnoses`` of it."""
    series: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for table in (records.steps, records.evals):
        for stat, column in table.items():
            if stat != "step":
                series["", stat] = (table["step"], column)
    layers: list[str] = []
    for table in (records.layers, records.layer_evals):
        if not table:
            continue
        names = table["layer"]
        for layer in dict.fromkeys(names.tolist()):
            layers += [] if layer in layers else [layer]
            sel = names == layer
            for stat, column in table.items():
                if stat not in ("step", "layer"):
                    series[layer, stat] = (table["step"][sel], column[sel])
    values = {k: get_field(config, k) for k in exp.grid}
    found: list[tuple[str, str]] | None = None
    if diagnoses is not None:
        found = [(d.rule, d.severity) for d in diagnoses]
    return Point(config=config, values=values, series=series, layers=layers, diagnoses=found)


def points(
    exp: Experiment,
    size: Literal["quick", "full"] = "quick",
    overrides: dict[str, Any] | None = None,
    on_run: Callable[[dict[str, Any], RunResult, list[Diagnosis]], None] | None = None,
) -> list[Point]:
    """Every run of the sweep, one after the other, each diagnosed by the BN doctor (``on_run``
    gets the run's config, result and diagnoses as it ends), as the verdict reads them."""
    found_points = []
    for config in configs(exp, size, overrides):
        cfg = parse_config(config)
        if cfg.distributed.replicas > 1:
            sink = MemorySink()
            done = train_replicas(cfg, sink)
            records, meta = sink.records, sink.meta
        else:
            done = train(cfg)
            assert done.records is not None  # the in-memory sink keeps them
            records, meta = done.records, done.meta
        found = diagnose(records, meta).diagnoses
        found_points.append(point(exp, config, records, found))
        if on_run is not None:
            on_run(config, done, found)
    return found_points


def run(
    exp: Experiment,
    size: Literal["quick", "full"] = "quick",
    overrides: dict[str, Any] | None = None,
    on_run: Callable[[dict[str, Any], RunResult, list[Diagnosis]], None] | None = None,
) -> dict[str, Any]:
    """:func:`points`, then the result (panels, verdict, the doctor's findings) as the server
    gives it."""
    return result(exp, points(exp, size, overrides, on_run))

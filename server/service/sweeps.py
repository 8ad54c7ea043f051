"""Sweeps (one run per point of a grid over config fields) and the experiments of the BN
literature (bncore.science.experiments) that run as sweeps, with their results beside the
paper's."""

from __future__ import annotations

import uuid
from typing import Any

from bncore.run.config import ConfigError, FieldPathError, get_field, parse_config
from bncore.run.sweep import grid_points, point_config
from bncore.science.experiments import EXPERIMENTS, Experiment, Point, needs, result
from bncore.status import FINISHED
from server.errors import Conflict, Invalid, InvalidGridPoint, NotFound, UnknownSweepField
from server.schemas import ExperimentStart, SweepCreate
from server.service.runs import RunService

MAX_POINTS = 256  # runs in one sweep, at most


class SweepService:
    def __init__(self, runs: RunService) -> None:
        self.runs, self.store = runs, runs.store

    def create(self, body: SweepCreate, experiment: str | None = None) -> dict[str, Any]:
        """Validate every point first (nothing is queued if one is bad), then queue them all;
        ``experiment``: the bncore.science.experiments key it reproduces."""
        if bool(body.grid) == bool(body.points):
            raise Invalid("give either grid (values per field) or points (one per run)")
        if body.grid and any(not v for v in body.grid.values()):
            raise Invalid("grid needs at least one field, each with at least one value")
        points = body.points or grid_points(body.grid)
        if len(points) > MAX_POINTS:
            raise Invalid(f"the sweep has {len(points)} points; at most {MAX_POINTS}")
        configs = []
        for point in points:
            label = ", ".join(f"{k}={v}" for k, v in point.items())
            try:
                data = point_config(body.base, point)
            except FieldPathError as exc:
                raise UnknownSweepField(exc.field, str(exc)) from None
            try:
                config = parse_config(data)
            except ConfigError as exc:
                raise InvalidGridPoint(label, exc.errors) from None
            self.runs.check_runnable(config)
            configs.append((label, config))
        self.runs.check_room(len(configs))
        sweep_id = uuid.uuid4().hex[:12]
        grid = body.grid or {k: list(dict.fromkeys(p.get(k) for p in points)) for k in points[0]}
        self.store.runs.create_sweep(sweep_id, body.name, body.base, grid, experiment)
        for label, config in configs:
            self.runs.launch(config, sweep_id, name=f"{body.name or 'sweep'}: {label}")
        return self.get(sweep_id)

    def get(self, sweep_id: str) -> dict[str, Any]:
        sweep = self.store.runs.get_sweep(sweep_id)
        if sweep is None:
            raise NotFound(f"no sweep with id {sweep_id!r}")
        items, _ = self.store.runs.search(sweep_id=sweep_id, limit=MAX_POINTS)
        ordered = sorted(items, key=lambda r: r["created_at"])
        return {**sweep, "runs": [self.runs.out(r) for r in ordered]}

    def experiment_sweeps(self) -> list[dict[str, Any]]:
        """Sweeps started from an experiment, newest first."""
        return self.store.runs.list_sweeps(experiments_only=True)

    # -- experiments --------------------------------------------------------------------------

    @staticmethod
    def experiment(key: str) -> Experiment:
        exp = EXPERIMENTS.get(key)
        if exp is None:
            raise NotFound(f"no experiment {key!r}; there are: {', '.join(EXPERIMENTS)}")
        return exp

    @staticmethod
    def experiments() -> list[dict[str, Any]]:
        """Every experiment: its claim, and the sweep it runs."""
        return [
            {"key": e.key, "title": e.title, "claim": e.claim, "note": e.note,
             "base": e.sweep("quick")["base"], "grid": e.grid, "full": e.full, "runs": e.runs()}
            for e in EXPERIMENTS.values()
        ]  # fmt: skip

    def start_experiment(self, key: str, body: ExperimentStart | None = None) -> dict[str, Any]:
        """Queue the experiment's sweep; its result: :meth:`result`."""
        exp = self.experiment(key)
        body = body or ExperimentStart()
        try:
            sweep = exp.sweep(body.size, body.overrides)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        name = exp.title + (" (full)" if body.size == "full" else "")
        return self.create(SweepCreate(name=name, **sweep), experiment=exp.key)

    def result(self, sweep_id: str) -> dict[str, Any]:
        """The experiment's panels from the sweep's runs so far (finished or not)."""
        sweep = self.get(sweep_id)
        if not sweep.get("experiment"):
            raise Conflict(
                f"sweep {sweep_id} was not started from an experiment: it has no result view"
            )
        exp = self.experiment(sweep["experiment"])
        runs = sweep["runs"][:MAX_POINTS]
        found = self.runs.diagnoses.of_runs([r["id"] for r in runs])
        points = []
        for run in runs:
            config = run["config"] or {}
            layers = list((run["meta"] or {}).get("layers") or [])
            values = {k: get_field(config, k) for k in exp.grid}  # its axes, not derived ones
            series = self.store.reads.many(run["id"], needs(exp, layers)) if layers else {}
            rules = [(d["rule"], d["severity"]) for d in found.get(run["id"], [])
                     if not d["silenced"]]  # fmt: skip
            points.append(Point(config=config, values=values, series=series, layers=layers,
                                diagnoses=rules))  # fmt: skip
        finished = sum(r["status"] in FINISHED for r in sweep["runs"])
        out = result(exp, points)
        out["diagnoses"] = [{"run_id": r["id"], "name": r["name"], **arm}
                            for r, arm in zip(runs, out["diagnoses"], strict=True)]  # fmt: skip
        return {**out, "sweep_id": sweep_id, "experiment": exp.key,
                "runs_total": len(sweep["runs"]), "runs_finished": finished}  # fmt: skip

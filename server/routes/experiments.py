"""/api/experiments: the BN literature's findings (bncore.experiments), each one POST away, and
the result of such a sweep, measured beside what the paper found."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException

from bncore.config import get_field
from bncore.experiments import EXPERIMENTS, Experiment, Point, needs, result
from server.routes.sweeps import MAX_POINTS, get_sweep, start_sweep
from server.schemas import (
    ExperimentOut,
    ExperimentResult,
    ExperimentStart,
    SweepCreate,
    SweepOut,
)
from server.services import Services, require_token, services

router = APIRouter(tags=["experiments"])
Svc = Annotated[Services, Depends(services)]
FINISHED = ("completed", "diverged", "failed", "cancelled", "interrupted")


def _experiment(key: str) -> Experiment:
    exp = EXPERIMENTS.get(key)
    if exp is None:
        raise HTTPException(404, f"no experiment {key!r}; there are: {', '.join(EXPERIMENTS)}")
    return exp


def _out(exp: Experiment) -> dict[str, Any]:
    return {"key": exp.key, "title": exp.title, "claim": exp.claim, "note": exp.note,
            "base": exp.sweep("quick")["base"], "grid": exp.grid, "full": exp.full,
            "runs": exp.runs()}  # fmt: skip


@router.get("/api/experiments", response_model=list[ExperimentOut])
def list_experiments() -> list[dict[str, Any]]:
    """Every experiment: its claim, and the sweep it runs."""
    return [_out(e) for e in EXPERIMENTS.values()]


@router.post(
    "/api/experiments/{key}",
    status_code=201,
    response_model=SweepOut,
    dependencies=[Depends(require_token)],
)
def start_experiment(
    key: str, svc: Svc, body: Annotated[ExperimentStart | None, Body()] = None
) -> dict[str, Any]:
    """Queues the experiment's sweep; its result: GET /api/sweeps/{id}/result."""
    exp = _experiment(key)
    body = body or ExperimentStart()
    try:
        sweep = exp.sweep(body.size, body.overrides)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    name = exp.title + (" (full)" if body.size == "full" else "")
    return start_sweep(SweepCreate(name=name, **sweep), svc, experiment=exp.key)


@router.get("/api/sweeps/{sweep_id}/result", response_model=ExperimentResult)
def sweep_result(sweep_id: str, svc: Svc) -> dict[str, Any]:
    """The experiment's panels from the sweep's runs so far (finished or not)."""
    sweep = get_sweep(sweep_id, svc)
    if not sweep.get("experiment"):
        raise HTTPException(
            409, f"sweep {sweep_id} was not started from an experiment: it has no result view"
        )
    exp = _experiment(sweep["experiment"])
    points = []
    for run in sweep["runs"][:MAX_POINTS]:
        config = run["config"] or {}
        layers = list((run["meta"] or {}).get("layers") or [])
        values = {k: get_field(config, k) for k in exp.grid}  # its axes, not derived settings
        series = svc.store.read_many(run["id"], needs(exp, layers)) if layers else {}
        points.append(Point(config=config, values=values, series=series, layers=layers))
    out = result(exp, points)
    finished = sum(r["status"] in FINISHED for r in sweep["runs"])
    return {**out, "sweep_id": sweep_id, "experiment": exp.key,
            "runs_total": len(sweep["runs"]), "runs_finished": finished}  # fmt: skip

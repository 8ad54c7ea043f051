"""/api/experiments: the BN literature's findings (bncore.science.experiments), each one POST
away; the result of such a sweep: GET /api/sweeps/{id}/result."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from server.routes.deps import Authorized, BoundedRoute, Svc
from server.schemas import ExperimentOut, ExperimentStart, SweepOut

router = APIRouter(route_class=BoundedRoute, prefix="/api/experiments", tags=["experiments"])


@router.get("", response_model=list[ExperimentOut])
def list_experiments(svc: Svc) -> list[dict[str, Any]]:
    """Every experiment: its claim, and the sweep it runs."""
    return svc.sweeps.experiments()


@router.post("/{key}", status_code=201, response_model=SweepOut, dependencies=Authorized)
def start_experiment(
    key: str, svc: Svc, body: Annotated[ExperimentStart | None, Body()] = None
) -> dict[str, Any]:
    """Queues the experiment's sweep; its result: GET /api/sweeps/{id}/result."""
    return svc.sweeps.start_experiment(key, body)

"""/api/sweeps: one run per point of a grid over config fields, listed together; and the result
of a sweep started from an experiment."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.routes.deps import Authorized, BoundedRoute, Svc
from server.schemas import ExperimentResult, SweepCreate, SweepOut

router = APIRouter(route_class=BoundedRoute, prefix="/api/sweeps", tags=["sweeps"])


@router.post("", status_code=201, response_model=SweepOut, dependencies=Authorized)
def create_sweep(body: SweepCreate, svc: Svc) -> dict[str, Any]:
    """Validate every point first (nothing is queued if one is bad), then queue them all."""
    return svc.sweeps.create(body)


@router.get("/{sweep_id}", response_model=SweepOut)
def get_sweep(sweep_id: str, svc: Svc) -> dict[str, Any]:
    return svc.sweeps.get(sweep_id)


@router.get("/{sweep_id}/result", response_model=ExperimentResult, tags=["experiments"])
def sweep_result(sweep_id: str, svc: Svc) -> dict[str, Any]:
    """The experiment's panels from the sweep's runs so far (finished or not)."""
    return svc.sweeps.result(sweep_id)

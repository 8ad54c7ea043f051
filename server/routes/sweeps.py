"""/api/sweeps: one run per point of a grid over config fields, listed together."""

from __future__ import annotations

import copy
import itertools
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException

from bncore.config import ConfigError, parse_config, set_field
from server.routes.runs import check_runnable, launch
from server.schemas import SweepCreate, SweepOut
from server.services import Services, require_token, services
from server.views import run_out

router = APIRouter(prefix="/api/sweeps", tags=["sweeps"])
Svc = Annotated[Services, Depends(services)]
MAX_POINTS = 256


@router.post("", status_code=201, response_model=SweepOut, dependencies=[Depends(require_token)])
def create_sweep(body: SweepCreate, svc: Svc) -> dict[str, Any]:
    """Validate every point first (nothing is queued if one is bad), then queue them all."""
    return start_sweep(body, svc)


def start_sweep(body: SweepCreate, svc: Services, experiment: str | None = None) -> dict[str, Any]:
    """Validates and queues the sweep's runs (see create_sweep); ``experiment``: the
    bncore.experiments key it reproduces."""
    if bool(body.grid) == bool(body.points):
        raise HTTPException(422, "give either grid (values per field) or points (one per run)")
    if body.grid and any(not v for v in body.grid.values()):
        raise HTTPException(422, "grid needs at least one field, each with at least one value")
    points = body.points or [
        dict(zip(body.grid, values, strict=True))
        for values in itertools.product(*body.grid.values())
    ]
    if len(points) > MAX_POINTS:
        raise HTTPException(422, f"the sweep has {len(points)} points; at most {MAX_POINTS}")
    configs = []
    for point in points:
        data = copy.deepcopy(body.base)
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        try:
            for key, value in point.items():
                set_field(data, key, value)
        except ValueError as exc:
            raise HTTPException(422, f"sweep key {exc}") from None
        try:
            config = parse_config(data)
        except ConfigError as exc:
            raise HTTPException(
                422, {"point": label, "errors": [{"field": f, "message": m} for f, m in exc.errors]}
            ) from None
        check_runnable(config)
        configs.append((label, config))
    sweep_id = uuid.uuid4().hex[:12]
    grid = body.grid or {k: list(dict.fromkeys(p.get(k) for p in points)) for k in points[0]}
    svc.store.create_sweep(sweep_id, body.name, body.base, grid, experiment)
    for label, config in configs:
        launch(svc, config, sweep_id, name=f"{body.name or 'sweep'}: {label}")
    return get_sweep(sweep_id, svc)


@router.get("/{sweep_id}", response_model=SweepOut)
def get_sweep(sweep_id: str, svc: Svc) -> dict[str, Any]:
    sweep = svc.store.get_sweep(sweep_id)
    if sweep is None:
        raise HTTPException(404, f"no sweep with id {sweep_id!r}")
    items, _ = svc.store.list_runs(sweep_id=sweep_id, limit=MAX_POINTS)
    return {
        **sweep,
        "runs": [run_out(r, svc) for r in sorted(items, key=lambda r: r["created_at"])],
    }

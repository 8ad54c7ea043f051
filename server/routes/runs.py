"""/api/runs: launch, list, inspect, cancel and delete runs; read, stream and export their
records."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import torch
from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse

from bncore.config import FILE_DATASETS, RunConfig
from bncore.records import (
    EVAL_COLUMNS,
    LAYER_COLUMNS,
    OPTIONAL_EVAL_COLUMNS,
    OPTIONAL_LAYER_COLUMNS,
    PERCENTILE_COLUMN,
    STEP_COLUMNS,
    padded,
)
from bncore.sinks import to_arrow
from server.downsample import minmax
from server.hub import Event
from server.schemas import MetricsOut, RunList, RunOut
from server.services import JSONResponse, Services, require_token, services
from server.store import ACTIVE, FINISHED
from server.views import run_out, table

router = APIRouter(prefix="/api/runs", tags=["runs"])
Svc = Annotated[Services, Depends(services)]
GLOBAL_STATS = (*STEP_COLUMNS, *EVAL_COLUMNS, *OPTIONAL_EVAL_COLUMNS)


def check_runnable(config: RunConfig) -> None:
    """What validation cannot know: this server's devices and files."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise HTTPException(
            400,
            "device='cuda' was asked for, but this server has no CUDA "
            "device; use device='cpu' or 'auto'",
        )
    if config.data.name in FILE_DATASETS and not Path(config.data.path or "").is_dir():
        raise HTTPException(
            400,
            f"data.path={config.data.path!r} is not a directory on this "
            f"server (data.name={config.data.name!r} is read from files)",
        )


def launch(
    svc: Services, config: RunConfig, sweep_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """Store a run as queued and hand it to the scheduler."""
    run = svc.store.create_run(
        id=uuid.uuid4().hex[:12],
        name=name or config.name,
        status="queued",
        source="server",
        sweep_id=sweep_id,
        config=config.model_dump(mode="json"),
    )
    svc.scheduler.submit(run["id"])
    return run


@router.post("", status_code=201, response_model=RunOut, dependencies=[Depends(require_token)])
def create_run(config: RunConfig, svc: Svc) -> dict[str, Any]:
    """Queue a training run; it starts as soon as a slot is free."""
    check_runnable(config)
    return run_out(launch(svc, config), svc)


@router.get("", response_model=RunList)
def list_runs(
    svc: Svc,
    status: Annotated[Literal[ACTIVE + FINISHED] | None, Query()] = None,  # type: ignore[valid-type]
    sweep_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Runs, newest first, optionally of one status or one sweep."""
    items, total = svc.store.list_runs(status, sweep_id, limit, offset)
    return {
        "items": [run_out(r, svc) for r in items],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/{run_id}", response_model=RunOut)
def get_run(run_id: str, svc: Svc) -> dict[str, Any]:
    return run_out(svc.run_or_404(run_id), svc)


@router.post("/{run_id}/cancel", response_model=RunOut, dependencies=[Depends(require_token)])
async def cancel_run(run_id: str, svc: Svc) -> dict[str, Any]:
    """Stop a queued or running run (within a second); its records are kept."""
    run = svc.run_or_404(run_id)
    if run["status"] not in ACTIVE:
        raise HTTPException(409, f"run {run_id} has already ended ({run['status']})")
    if run["source"] == "client":
        if svc.store.finish_run(run_id, "cancelled", message="cancelled through the API"):
            svc.publish_status(run_id)
    elif not svc.scheduler.cancel(run_id):
        raise HTTPException(409, f"run {run_id} is not queued or training here")
    deadline = time.monotonic() + 2.0  # answer with the final status when it comes quickly
    while time.monotonic() < deadline and svc.store.get_run(run_id)["status"] in ACTIVE:
        await asyncio.sleep(0.05)
    return run_out(svc.run_or_404(run_id), svc)


@router.delete("/{run_id}", status_code=204, dependencies=[Depends(require_token)])
def delete_run(run_id: str, svc: Svc) -> Response:
    """Delete a run and its records; refused while it is queued or training."""
    run = svc.run_or_404(run_id)
    if run["status"] in ACTIVE:
        raise HTTPException(409, f"run {run_id} is {run['status']}: cancel it before deleting")
    svc.store.delete_run(run_id)
    svc.hub.forget(run_id)
    return Response(status_code=204)


@router.get("/{run_id}/layers")
def layers(run_id: str, svc: Svc) -> dict[str, Any]:
    """The run's layers, channels and tracked units, and the statistics it has records of."""
    run = svc.run_or_404(run_id)
    meta = run.get("meta") or {}
    names = svc.store.series_names(run_id)
    return {
        "layers": meta.get("layers", sorted({lay for lay, _ in names if lay})),
        "channels": meta.get("channels"),
        "tracked_units": meta.get("tracked_units"),
        "stats": {
            "global": sorted({s for lay, s in names if not lay}),
            "layer": sorted({s for lay, s in names if lay}),
        },
        "channel_steps": svc.store.channel_steps(run_id),
    }


def _check_stat(stat: str) -> bool:
    """True for a per-layer statistic, False for a global one; 400 for an unknown name."""
    if stat in GLOBAL_STATS:
        return False
    if stat in (*LAYER_COLUMNS, *OPTIONAL_LAYER_COLUMNS) or PERCENTILE_COLUMN.fullmatch(stat):
        return True
    raise HTTPException(
        400,
        f"unknown stat {stat!r}; per step: {', '.join(STEP_COLUMNS)}; "
        f"per evaluation: {', '.join((*EVAL_COLUMNS, *OPTIONAL_EVAL_COLUMNS))}; per layer: "
        f"{', '.join((*LAYER_COLUMNS, *OPTIONAL_LAYER_COLUMNS))}, p15_j/p50_j/p85_j",
    )


@router.get(
    "/{run_id}/metrics", response_class=JSONResponse, responses={200: {"model": MetricsOut}}
)
def metrics(
    run_id: str,
    svc: Svc,
    stat: Annotated[list[str], Query(min_length=1, description="statistics to read")],
    layer: Annotated[list[str] | None, Query(description="layers (default: all)")] = None,
    step_min: Annotated[int | None, Query(ge=0)] = None,
    step_max: Annotated[int | None, Query(ge=0)] = None,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
) -> JSONResponse:
    """Series of statistics over steps, downsampled on the server to at most ``max_points``
    per series, keeping each bucket's minimum and maximum."""
    run = svc.run_or_404(run_id)
    if step_min is not None and step_max is not None and step_min > step_max:
        raise HTTPException(400, f"step_min={step_min} is after step_max={step_max}")
    known = (run.get("meta") or {}).get("layers") or sorted(
        {lay for lay, _ in svc.store.series_names(run_id) if lay}
    )
    for name in layer or []:
        if name not in known:
            raise HTTPException(400, f"unknown layer {name!r}; this run has: {', '.join(known)}")
    out = []
    for s in stat:
        for lay in (layer or known) if _check_stat(s) else [""]:
            steps, vals = svc.store.read_series(run_id, lay, s, step_min, step_max)
            ds, dv = minmax(steps, vals, max_points)
            out.append(
                {"layer": lay, "stat": s, "steps": ds, "values": dv, "points_total": len(steps)}
            )
    return JSONResponse({"run_id": run_id, "max_points": max_points, "series": out})


@router.get("/{run_id}/channels", response_class=JSONResponse)
def channel_arrays(
    run_id: str, svc: Svc, step: Annotated[int | None, Query(ge=0)] = None
) -> JSONResponse:
    """Per-channel arrays of every layer at ``step`` (default: the latest kept)."""
    run = svc.run_or_404(run_id)
    rows = svc.store.read_channels(run_id, step)
    order = {name: i for i, name in enumerate((run.get("meta") or {}).get("layers") or [])}
    if order:  # the run's own order (execution order for a watched model)
        rows.sort(key=lambda r: order.get(r["layer"], len(order)))
    if step is not None and not rows:
        raise HTTPException(
            404,
            f"no per-channel arrays at step {step}; kept steps: "
            f"{svc.store.channel_steps(run_id)[-20:]} (last 20)",
        )
    return JSONResponse({"run_id": run_id, "layers": rows})


def sse(event: Event) -> dict[str, Any]:
    return {
        "event": event.kind,
        "id": str(event.seq),
        "data": orjson.dumps(event.data, option=orjson.OPT_SERIALIZE_NUMPY).decode(),
    }


@router.get("/{run_id}/stream")
async def stream(
    run_id: str,
    svc: Svc,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0, description="as Last-Event-ID")] = None,
) -> EventSourceResponse:
    """Server-sent events: ``records`` (each batch as it is stored, id = its sequence number),
    ``status`` changes, and ``reset`` when a reconnecting client missed more than the server
    kept (reload through /metrics). Resumes after ``Last-Event-ID``."""
    run = svc.run_or_404(run_id)
    if last_event_id is not None:
        try:
            after = int(last_event_id)
        except ValueError:
            raise HTTPException(400, "Last-Event-ID must be an event id (an integer)") from None
    queue, missed = svc.hub.subscribe(run_id, after)
    seq = run["seq"]

    async def events():
        try:
            if after is not None and after < seq and not (missed and missed[0].seq == after + 1):
                yield {
                    "event": "reset",
                    "id": str(seq),
                    "data": orjson.dumps(
                        {"seq": seq, "reason": "missed records are no longer kept for streaming"}
                    ).decode(),
                }
            for e in missed:
                yield sse(e)
            yield sse(Event("status", seq, run_out(run, svc)))
            if run["status"] in FINISHED:
                return
            while True:
                event = await queue.get()
                yield sse(event)
                if event.kind == "status" and event.data["status"] in FINISHED:
                    return
        finally:
            svc.hub.unsubscribe(run_id, queue)

    return EventSourceResponse(events(), ping=15)


@router.get("/{run_id}/export")
def export(
    run_id: str,
    svc: Svc,
    format: Literal["csv", "parquet"] = "csv",
    table_name: Annotated[
        Literal["steps", "layers", "evals", "channels"], Query(alias="table")
    ] = "layers",
) -> Response:
    """One records table as a file: CSV (per-channel arrays as one column per channel, empty
    past a narrower layer's last channel) or Parquet (per-channel arrays as lists)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    svc.run_or_404(run_id)
    data = table(svc, run_id, table_name)
    if format == "csv":
        cols: dict[str, Any] = {}
        for k, v in data.items():
            if v.ndim == 2 or v.dtype == object:
                grid = padded(v)
                cols.update({f"{k}[{i}]": grid[:, i] for i in range(grid.shape[1])})
            else:
                cols[k] = v
        t = pa.table(cols) if cols else pa.table({"step": pa.array([], pa.int64())})
    else:
        t = to_arrow(data) if data else pa.table({"step": pa.array([], pa.int64())})
    buf = io.BytesIO()
    if format == "csv":
        pyarrow.csv.write_csv(t, buf)
        media = "text/csv"
    else:
        pyarrow.parquet.write_table(t, buf)
        media = "application/vnd.apache.parquet"
    filename = f"{run_id}-{table_name}.{format}"
    return Response(
        buf.getvalue(),
        media_type=media,
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )

"""/api/runs: launch, list, inspect, cancel and delete runs; read, stream and export their
records. Each route hands its request to the service (server.service)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.sse import _SSE_EVENT_SCHEMA
from sse_starlette.sse import EventSourceResponse

from bncore.run.config import RunConfig
from bncore.status import RunStatus
from server.errors import BadRequest
from server.routes.deps import Authorized, BoundedRoute, JSONResponse, Svc
from server.schemas import (
    ChannelsOut,
    DiagnosesOut,
    MetricsOut,
    RunList,
    RunOut,
    SilenceIn,
    SilenceOut,
)
from server.store.schema import MAX_INT
from server.views import export_file

router = APIRouter(route_class=BoundedRoute, prefix="/api/runs", tags=["runs"])


@router.post("", status_code=201, response_model=RunOut, dependencies=Authorized)
def create_run(config: RunConfig, svc: Svc) -> dict[str, Any]:
    """Queue a training run; it starts as soon as a slot is free."""
    return svc.runs.create(config)


@router.get("", response_model=RunList)
def list_runs(
    svc: Svc,
    status: RunStatus | None = None,
    sweep_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> dict[str, Any]:
    """Runs, newest first, optionally of one status or one sweep."""
    return svc.runs.page(status.value if status else None, sweep_id, limit, offset)


@router.get("/{run_id}", response_model=RunOut)
def get_run(run_id: str, svc: Svc) -> dict[str, Any]:
    return svc.runs.out(svc.runs.get(run_id))


@router.post("/{run_id}/cancel", response_model=RunOut, dependencies=Authorized)
async def cancel_run(run_id: str, svc: Svc) -> dict[str, Any]:
    """Stop a queued or running run (within a second); its records are kept. Answers with
    the final status when it comes within 2 s."""
    await run_in_threadpool(svc.runs.cancel, run_id)
    return await svc.runs.settled(run_id, within=2.0)


@router.delete("/{run_id}", status_code=204, dependencies=Authorized)
def delete_run(run_id: str, svc: Svc) -> Response:
    """Delete a run and its records; refused while it is queued or training."""
    svc.runs.delete(run_id)
    return Response(status_code=204)


@router.get("/{run_id}/layers")
def layers(run_id: str, svc: Svc) -> dict[str, Any]:
    """The run's layers, channels and tracked units, and the statistics it has records of."""
    return svc.records.layers(run_id)


@router.get(
    "/{run_id}/metrics", response_class=JSONResponse, responses={200: {"model": MetricsOut}}
)
def metrics(
    run_id: str,
    svc: Svc,
    stat: Annotated[
        list[str], Query(min_length=1, max_length=64, description="statistics to read")
    ],
    layer: Annotated[
        list[str] | None, Query(max_length=1024, description="layers (default: all)")
    ] = None,
    step_min: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
    step_max: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
) -> JSONResponse:
    """Series of statistics over steps (names: docs/statistics.md), downsampled on the server
    to at most ``max_points`` per series, keeping each bucket's minimum and maximum."""
    data = svc.records.metrics(run_id, stat, layer, step_min, step_max, max_points)
    return JSONResponse(data)


@router.get(
    "/{run_id}/channels", response_class=JSONResponse, responses={200: {"model": ChannelsOut}}
)
def channel_arrays(
    run_id: str, svc: Svc, step: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None
) -> JSONResponse:
    """Per-channel arrays of every layer at ``step`` (default: the latest kept)."""
    return JSONResponse(svc.records.channels(run_id, step))


@router.get("/{run_id}/diagnoses", response_model=DiagnosesOut)
def run_diagnoses(run_id: str, svc: Svc) -> dict[str, Any]:
    """What the BN doctor (docs/diagnoses.md) found in the run, worst first, silenced ones
    included; what the run was checked for (and why not, where it could not be); through which
    step."""
    return svc.diagnoses.report(svc.runs.get(run_id))


@router.put("/{run_id}/diagnoses/{rule}", response_model=SilenceOut, dependencies=Authorized)
def silence_diagnosis(run_id: str, rule: str, body: SilenceIn, svc: Svc) -> dict[str, Any]:
    """Silence one rule for the run (known and intended), or not: its diagnosis stays listed,
    marked silenced, and is left out of badges and warnings. Any rule of docs/diagnoses.md,
    found in the run or not yet."""
    return svc.diagnoses.silence(svc.runs.get(run_id), rule, body.silenced)


@router.get(
    "/{run_id}/stream",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"itemSchema": _SSE_EVENT_SCHEMA}},
            "description": "events: records, status, diagnosis, reset (data: JSON)",
        }
    },
)
async def stream(
    run_id: str,
    svc: Svc,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT, description="as Last-Event-ID")] = None,
) -> EventSourceResponse:
    """Server-sent events: ``records`` (each batch as it is stored, id = its sequence number),
    ``status`` changes, ``diagnosis`` (a diagnosis of the BN doctor made or changed, as in
    GET .../diagnoses), and ``reset`` when a reconnecting client missed more than the server
    kept (reload through /metrics). Resumes after ``Last-Event-ID``."""
    if last_event_id is not None:
        try:
            after = int(last_event_id)
        except ValueError:
            raise BadRequest("Last-Event-ID must be an event id (an integer)") from None
    events = svc.runs.follow(run_id, after)
    first = await anext(events)  # a missing run fails here, before the stream opens

    async def send() -> AsyncIterator[bytes]:
        try:
            yield first.wire
            async for event in events:
                yield event.wire
        finally:
            await events.aclose()  # the listener leaves the hub when the client goes

    return EventSourceResponse(send(), ping=15)


@router.get(
    "/{run_id}/export",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {"schema": {"format": "binary"}},
            },
            "description": "the table as a file (Content-Disposition: attachment)",
        }
    },
)
def export(
    run_id: str,
    svc: Svc,
    format: Literal["csv", "parquet"] = "csv",
    table_name: Annotated[
        Literal["steps", "layers", "evals", "layer_evals", "channels"], Query(alias="table")
    ] = "layers",
) -> Response:
    """One records table as a file: CSV (per-channel arrays as one column per channel, empty
    past a narrower layer's last channel) or Parquet (per-channel arrays as lists)."""
    body, media = export_file(svc.records.table(run_id, table_name), format)
    filename = f"{run_id}-{table_name}.{format}"
    return Response(
        body,
        media_type=media,
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )

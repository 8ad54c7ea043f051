"""Records in: the documented endpoints a worker, or a user's own training script
(bnscope.client), uses to report a run. The batch format: server.batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool

from server import keys
from server.errors import Invalid
from server.routes.deps import Authorized, BoundedRoute, Svc
from server.schemas import RECORDS_BODY, ClientRunCreate, IngestAck, RunOut, StatusUpdate

router = APIRouter(
    route_class=BoundedRoute, prefix="/api/runs", tags=["ingest"], dependencies=Authorized
)
#: The run's write token: given to whoever created the run, required on all that it writes.
RunToken = Annotated[
    str | None, Header(alias=keys.HEADER, description="the write token the run was created with")
]


@router.post("/client", status_code=201, response_model=RunOut)
def create_client_run(body: ClientRunCreate, svc: Svc) -> dict[str, Any]:
    """Register a run that a script of your own trains and reports (see bnscope.client)."""
    return svc.runs.create_client_run(body)


@router.post(
    "/{run_id}/records", response_model=IngestAck, openapi_extra={"requestBody": RECORDS_BODY}
)
async def ingest(run_id: str, request: Request, svc: Svc, token: RunToken = None) -> dict[str, Any]:
    """Store a batch of records, acknowledge it, stream it (sent as application/json)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise Invalid(
            f"records are sent with Content-Type: application/json, not {media or 'none'!r}"
        )
    return await run_in_threadpool(svc.runs.ingest, run_id, await request.body(), token)


@router.post("/{run_id}/heartbeat", status_code=204)
def heartbeat(run_id: str, svc: Svc, token: RunToken = None) -> None:
    """A script's run is alive (bnscope.client sends one every few seconds while idle); a
    script-reported run silent for ``client_timeout`` seconds is marked failed."""
    svc.runs.heartbeat(run_id, token)


@router.post("/{run_id}/status", response_model=RunOut)
def report_status(
    run_id: str, update: StatusUpdate, svc: Svc, token: RunToken = None
) -> dict[str, Any]:
    """A run's worker (or client) reports it started (with its metadata) or how it ended."""
    return svc.runs.report_status(run_id, update, token)

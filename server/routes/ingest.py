"""Records in: the documented endpoints a worker, or a user's own training script
(bnscope.client), uses to report a run.

``POST /api/runs/{id}/records`` takes a JSON object of bncore.records tables, each a mapping of
equal-length columns: ``{"seq": 7, "steps": {"step": [...], "loss": [...]}, "layers": {"step":
[...], "layer": [...], "pre_var": [...]}, "channels": {...}, "evals": {...}}``; null stands for
NaN. ``seq`` (optional, increasing per run) makes a retried send harmless. A batch is stored
atomically before it is acknowledged, then streamed to live listeners.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from bncore.records import CHANNEL_COLUMNS, channel_column, channel_widths, json_columns
from server.hub import Event
from server.schemas import ClientRunCreate, IngestAck, RunOut, StatusUpdate
from server.services import Services, require_token, services
from server.store import ACTIVE
from server.views import run_out

router = APIRouter(prefix="/api/runs", tags=["ingest"], dependencies=[Depends(require_token)])
Svc = Annotated[Services, Depends(services)]
TABLES = ("steps", "layers", "channels", "evals")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,63}")


def parse_batch(body: bytes) -> tuple[dict[str, dict[str, np.ndarray]], int | None]:
    """Checked, as numpy columns; a 422 that says what is wrong otherwise."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(422, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPException(422, "the body must be a JSON object of tables")
    unknown = set(data) - {*TABLES, "seq"}
    if unknown:
        raise HTTPException(422, f"unknown keys {sorted(unknown)}; tables are {TABLES} (+ seq)")
    seq = data.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise HTTPException(422, "seq must be a positive integer")
    batch = {}
    for name in TABLES:
        t = data.get(name)
        if t is None or t == {}:
            continue
        if not isinstance(t, dict) or "step" not in t:
            raise HTTPException(422, f"{name} must be an object of columns with a 'step' column")
        n = len(t["step"]) if isinstance(t["step"], list) else -1
        if n == 0:
            continue  # an empty table: nothing to store
        cols: dict[str, np.ndarray] = {}
        for col, values in t.items():
            where = f"{name}.{col}"
            if not NAME.fullmatch(col):
                raise HTTPException(422, f"{where}: column names are letters, digits, _ and .")
            if not isinstance(values, list) or len(values) != n:
                raise HTTPException(422, f"{where}: every column is a list as long as 'step'")
            try:
                if col == "layer":
                    arr = np.asarray([str(v) for v in values])
                    if any(not NAME.fullmatch(v) for v in arr.tolist()):
                        raise ValueError("layer names are letters, digits, _ and .")
                elif col == "step":
                    arr = np.asarray(values, dtype=np.int64)
                    if (arr < 0).any():
                        raise ValueError("steps are non-negative")
                elif name == "channels" and col in CHANNEL_COLUMNS:
                    arr = _channel_column(values)
                else:
                    arr = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise HTTPException(422, f"{where}: {exc}") from None
            cols[col] = arr
        if name in ("layers", "channels") and "layer" not in cols:
            raise HTTPException(422, f"{name} needs a 'layer' column")
        if name == "channels":
            missing = [c for c in CHANNEL_COLUMNS if c not in cols]
            if missing:
                raise HTTPException(
                    422, f"channels needs per-channel columns {list(CHANNEL_COLUMNS)}; "
                    f"missing {missing}",
                )  # fmt: skip
            widths = {c: channel_widths({"pre_mean": cols[c]}).tolist() for c in CHANNEL_COLUMNS}
            if len({tuple(w) for w in widths.values()}) > 1:
                raise HTTPException(
                    422, "channels: each row's per-channel columns must all have the layer's "
                    "channel count",
                )  # fmt: skip
        elif any(v.ndim != 1 for v in cols.values()):
            raise HTTPException(422, f"{name}: columns are flat lists of numbers")
        batch[name] = cols
    return batch, seq


def _channel_column(values: list[Any]) -> np.ndarray:
    """Rows of one per-channel column, each a list of the layer's C numbers (null: NaN);
    layers of different widths may share a batch."""
    if any(not isinstance(v, list) or not v for v in values):
        raise ValueError("each row is a non-empty list of per-channel numbers")
    rows = [np.asarray([math.nan if x is None else x for x in v], dtype=np.float64) for v in values]
    if any(r.ndim != 1 for r in rows):
        raise ValueError("each row is a flat list of per-channel numbers")
    return channel_column(rows)


def live_view(batch: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """What a live listener gets of a batch: everything but per-channel arrays, of which only
    each layer's latest row."""
    out: dict[str, Any] = {k: json_columns(v) for k, v in batch.items() if k != "channels"}
    ch = batch.get("channels")
    if ch:
        last = {str(lay): i for i, lay in enumerate(ch["layer"])}
        idx = np.asarray(sorted(last.values()))
        out["channels"] = json_columns({k: v[idx] for k, v in ch.items()})
    return out


@router.post("/client", status_code=201, response_model=RunOut)
def create_client_run(body: ClientRunCreate, svc: Svc) -> dict[str, Any]:
    """Register a run that a script of your own trains and reports (see bnscope.client)."""
    meta = {**body.meta, "steps_total": body.steps_total}
    run = svc.store.create_run(
        id=uuid.uuid4().hex[:12],
        name=body.name,
        status="running",
        source="client",
        meta=meta,
        started_at=time.time(),
    )
    svc.seen(run["id"])
    return {**run_out(run, svc), "heartbeat_s": svc.settings.client_timeout / 4}


@router.post("/{run_id}/records", response_model=IngestAck)
async def ingest(run_id: str, request: Request, svc: Svc) -> dict[str, Any]:
    """Store a batch of records, acknowledge it, stream it."""
    run = svc.run_or_404(run_id)
    if run["status"] != "running":
        raise HTTPException(
            409, f"run {run_id} is {run['status']}: it takes records only while running"
        )
    svc.seen(run_id)
    batch, client_seq = parse_batch(await request.body())
    seq, stored = await run_in_threadpool(svc.store.append, run_id, batch, client_seq)
    if stored:
        svc.hub.publish(run_id, Event("records", seq, {"seq": seq, **live_view(batch)}))
    return {"seq": seq, "stored": stored}


@router.post("/{run_id}/heartbeat", status_code=204)
def heartbeat(run_id: str, svc: Svc) -> None:
    """A script's run is alive (bnscope.client sends one every few seconds while idle); a
    script-reported run silent for ``client_timeout`` seconds is marked failed."""
    run = svc.run_or_404(run_id)
    if run["status"] not in ACTIVE:
        raise HTTPException(409, f"run {run_id} has already ended ({run['status']})")
    svc.seen(run_id)


@router.post("/{run_id}/status", response_model=RunOut)
def report_status(run_id: str, update: StatusUpdate, svc: Svc) -> dict[str, Any]:
    """A run's worker (or client) reports it started (with its metadata) or how it ended."""
    run = svc.run_or_404(run_id)
    if run["status"] not in ACTIVE:
        raise HTTPException(409, f"run {run_id} has already ended ({run['status']})")
    svc.seen(run_id)
    fields = {
        k: v
        for k, v in (
            ("meta", update.meta),
            ("final", update.final),
            ("message", update.message),
            ("steps_done", update.steps_done),
        )
        if v is not None
    }
    if update.traceback:
        fields["message"] = f"{update.message or ''}\n{update.traceback}".strip()
    if update.status == "running":
        svc.store.update_run(
            run_id, status="running", started_at=run["started_at"] or time.time(), **fields
        )
    else:
        svc.store.finish_run(run_id, update.status, **fields)
    svc.publish_status(run_id)
    return run_out(svc.run_or_404(run_id), svc)

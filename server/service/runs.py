"""Runs: launching one here, registering one a script trains, taking its records and status,
cancelling, deleting, and telling live listeners. The API's routes and the dashboard both call
this; it raises server.errors, never HTTP."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import torch

from bncore.run.budget import estimate, gigabytes
from bncore.run.config import FILE_DATASETS, RunConfig
from bncore.run.data import DatasetError, dataset_folder
from bncore.status import ACTIVE, FINISHED, RunStatus
from server import keys
from server.batches import live_view, parse_batch
from server.errors import (
    Busy,
    Conflict,
    Forbidden,
    NotFound,
    NotRunnable,
    TooLarge,
    Unauthorized,
)
from server.hub import GONE, Event, Hub
from server.scheduler import Scheduler
from server.schemas import ClientRunCreate, StatusUpdate
from server.service.diagnoses import DiagnosisService
from server.settings import Settings
from server.store import Store
from server.views import run_out

log = logging.getLogger("bnscope.server")
#: Seconds a worker may take to start (spawn, imports) before its first heartbeat is due.
WORKER_STARTUP = 120.0


class RunService:
    def __init__(self, settings: Settings, store: Store, hub: Hub, scheduler: Scheduler) -> None:
        self.settings, self.store, self.hub, self.scheduler = settings, store, hub, scheduler
        #: when each script-reported run (bnscope.client) last said anything (time.monotonic())
        self.last_seen: dict[str, float] = {}
        self.heard: set[str] = set()  # runs whose reporter has said something to this process
        #: the BN doctor: each run's records diagnosed as they are ingested
        self.diagnoses = DiagnosisService(settings, store, hub)

    # -- who may change things ----------------------------------------------------------------

    def has_token(self, token: str | None) -> bool:
        """Whether ``token`` is the server's (always, for a server without one)."""
        expected = self.settings.token
        given = (token or "").strip().encode()
        return not expected or secrets.compare_digest(given, expected.encode())

    def authorize(self, token: str | None) -> None:
        """Calls that change anything carry the server's token, when it has one."""
        if not self.has_token(token):
            raise Unauthorized(
                "this server requires 'Authorization: Bearer <token>' on calls that change anything"
            )

    # -- reading ------------------------------------------------------------------------------

    def get(self, run_id: str) -> dict[str, Any]:
        """The stored run; NotFound if there is none."""
        run = self.store.runs.get(run_id)
        if run is None:
            raise NotFound(f"no run with id {run_id!r}")
        return run

    def out(self, run: dict[str, Any]) -> dict[str, Any]:
        """A stored run as the API shows it."""
        run_id = run["id"]
        return run_out(run, self.scheduler.position(run_id), self.scheduler.queued_for(run_id))

    def newest(self, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` runs, newest first, as the API shows them (with its place in
        the queue, for a queued run, and what the BN doctor found: :meth:`listed`)."""
        return self.listed(self.store.runs.search(limit=limit)[0])

    def page(
        self, status: str | None, sweep_id: str | None, limit: int, offset: int
    ) -> dict[str, Any]:
        items, total = self.store.runs.search(status, sweep_id, limit, offset)
        return {"items": self.listed(items), "total": total,
                "limit": limit, "offset": offset}  # fmt: skip

    def listed(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Runs as a list shows them: each as the API does, with ``doctor``, its count of
        active, unsilenced errors and warnings (read from the stored diagnoses, at once)."""
        counts = self.diagnoses.counts([r["id"] for r in runs])
        out = []
        for r in runs:
            found = counts.get(r["id"], {})
            doctor = {"errors": found.get("error", 0), "warnings": found.get("warning", 0)}
            out.append({**self.out(r), "doctor": doctor})
        return out

    # -- runs trained here --------------------------------------------------------------------

    def check_runnable(self, config: RunConfig) -> None:
        """What validation cannot know: this server's devices and files."""
        if config.device == "cuda" and not torch.cuda.is_available():
            raise NotRunnable(
                "device='cuda' was asked for, but this server has no CUDA "
                "device; use device='cpu' or 'auto'",
                field="device",
            )
        if config.data.name in FILE_DATASETS:
            # only under the data root, and the same answer for a missing and a forbidden path
            try:
                dataset_folder(config.data.path, self.settings.dataset_root)
            except DatasetError as exc:
                raise NotRunnable(str(exc), field="data.path") from None
        self._check_budget(config)

    def _check_budget(self, config: RunConfig) -> None:
        """The run's estimated peak memory and records (bncore.run.budget) fit this server's limits
        for one run."""
        need, limits = estimate(config), self.settings
        if need.memory > limits.run_memory:
            raise NotRunnable(
                f"this run would need about {gigabytes(need.memory)} of memory "
                f"({need.memory_parts()}); a run on this server may use "
                f"{gigabytes(limits.run_memory)} (--max-run-memory): make model.width, "
                "model.depth or batch_size smaller",
                field="model.width",
            )
        if need.disk > limits.max_run_disk:
            raise NotRunnable(
                f"this run would keep about {gigabytes(need.disk)} of records over "
                f"{config.steps} steps; a run on this server may keep "
                f"{gigabytes(limits.max_run_disk)} (--max-run-disk): raise stats_interval "
                "or channel_interval, or train fewer steps",
                field="stats_interval",
            )

    def check_room(self, runs: int = 1) -> None:
        """The queue can take ``runs`` more (Busy otherwise: nothing is queued)."""
        waiting, limit = len(self.scheduler.queue), self.settings.max_queued
        if waiting + runs > limit:
            raise Busy(
                f"{waiting} runs are waiting and this server queues at most {limit} "
                f"(--max-queued); {runs} more do not fit: try again when some have started, "
                "or cancel some"
            )

    def launch(
        self, config: RunConfig, sweep_id: str | None = None, name: str | None = None
    ) -> dict[str, Any]:
        """Store a run as queued and hand it to the scheduler (checked beforehand)."""
        run = self.store.runs.create(
            id=uuid.uuid4().hex[:12],
            name=name or config.name,
            status=RunStatus.QUEUED.value,
            source="server",
            sweep_id=sweep_id,
            config=config.model_dump(mode="json"),
        )
        self.scheduler.submit(run["id"])
        return run

    def create(self, config: RunConfig) -> dict[str, Any]:
        """Queue a training run; it starts as soon as a slot is free."""
        self.check_runnable(config)
        self.check_room()
        return self.out(self.launch(config))

    def cancel(self, run_id: str) -> None:
        """Stop a queued or running run; its records are kept."""
        run = self.get(run_id)
        if run["status"] not in ACTIVE:
            raise Conflict(f"run {run_id} has already ended ({run['status']})")
        if run["source"] == "client":
            self.finish(run_id, RunStatus.CANCELLED, message="cancelled through the API")
        elif not self.scheduler.cancel(run_id):
            raise Conflict(f"run {run_id} is not queued or training here")

    async def settled(self, run_id: str, within: float) -> dict[str, Any]:
        """The run once it has a final status, or as it is after ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.get(run_id)["status"] in ACTIVE:
            await asyncio.sleep(0.05)
        return self.out(self.get(run_id))

    def delete(self, run_id: str) -> None:
        """Delete a run and its records; refused while it is queued or training."""
        run = self.get(run_id)
        if run["status"] in ACTIVE:
            raise Conflict(f"run {run_id} is {run['status']}: cancel it before deleting")
        self.store.delete_run(run_id)
        self.hub.forget(run_id)
        self.diagnoses.forget(run_id)

    # -- runs reported by a worker or a script ------------------------------------------------

    def create_client_run(self, body: ClientRunCreate) -> dict[str, Any]:
        """Register a run that a script of its own trains and reports (bnscope.client). The
        answer carries the run's write token, given only here: its records, status and
        heartbeats must carry it."""
        token, key = keys.mint()
        run = self.store.runs.create(
            id=uuid.uuid4().hex[:12],
            name=body.name,
            status=RunStatus.RUNNING.value,
            source="client",
            meta={**body.meta, "steps_total": body.steps_total},
            started_at=time.time(),
            write_key=key,
        )
        self.seen(run["id"])
        return {
            **self.out(run),
            "heartbeat_s": self.settings.client_timeout / 4,
            "write_token": token,
        }

    def _reporting(
        self, run_id: str, token: str | None, running_only: bool = False
    ) -> dict[str, Any]:
        """The run, if ``token`` is its write token and it still takes reports; a script's
        run that a restart left interrupted is running again (its script came back)."""
        run = self.get(run_id)
        if not keys.matches(run.get("write_key"), token):
            raise Forbidden(
                f"only whoever created run {run_id} may write its records and status: send the "
                f"write token it was given, in the {keys.HEADER} header"
                + ("" if token else f" (this request has no {keys.HEADER})")
            )
        if run["status"] == RunStatus.INTERRUPTED.value and self.store.runs.resume(run_id):
            # the server restarted under a script that goes on: its run goes on too (records
            # it held back are stored; those acknowledged before, by client_seq, not again)
            log.info("run %s: its script came back after a restart; running again", run_id)
            run = self.get(run_id)
            self.publish_status(run_id)
        if running_only and run["status"] != RunStatus.RUNNING.value:
            raise Conflict(f"run {run_id} is {run['status']}: it takes records only while running")
        if run["status"] not in ACTIVE:
            raise Conflict(f"run {run_id} has already ended ({run['status']})")
        self.seen(run_id)
        return run

    def ingest(self, run_id: str, body: bytes, token: str | None) -> dict[str, Any]:
        """Check a batch of records (server.batches), store it (atomically, before it is
        acknowledged), stream it, then diagnose it (server.service.diagnoses): the answer
        carries the diagnoses it made or changed that are active and not silenced, if any."""
        run = self._reporting(run_id, token, running_only=True)
        batch, client_seq = parse_batch(body)
        limit, kept = self.settings.max_run_disk, self.store.series.kept_bytes(run_id)
        if kept + len(body) > limit:
            raise TooLarge(
                f"run {run_id} keeps {gigabytes(kept)} of "
                f"records, and a run on this server may keep {gigabytes(limit)} "
                "(--max-run-disk): record less often (bnscope.client's intervals), or start "
                "a new run"
            )
        found: list[dict[str, Any]] = []
        with self.diagnoses.holding(run_id):
            seq, stored = self.store.series.append(run_id, batch, client_seq)
            if stored:
                self.hub.publish(run_id, Event("records", seq, {"seq": seq, **live_view(batch)}))
                found = self.diagnoses.feed(run, seq, batch)
        return {"seq": seq, "stored": stored, **({"diagnoses": found} if found else {})}

    def heartbeat(self, run_id: str, token: str | None) -> None:
        """A script's run is alive; one silent for ``client_timeout`` seconds is failed."""
        self._reporting(run_id, token)

    def report_status(self, run_id: str, update: StatusUpdate, token: str | None) -> dict[str, Any]:
        """A run's worker (or script) says it started (with its metadata) or how it ended."""
        run = self._reporting(run_id, token)
        meta = update.meta
        if meta is not None and "steps_total" not in meta:  # as the script registered it
            meta = {**meta, "steps_total": (run.get("meta") or {}).get("steps_total")}
        fields = {
            k: v
            for k, v in (
                ("meta", meta),
                ("final", update.final),
                ("message", update.message),
                ("steps_done", update.steps_done),
            )
            if v is not None
        }
        if update.traceback:
            fields["message"] = f"{update.message or ''}\n{update.traceback}".strip()
        if update.status == RunStatus.RUNNING:
            self.store.runs.update(
                run_id,
                status=RunStatus.RUNNING.value,
                started_at=run["started_at"] or time.time(),
                **fields,
            )
            if update.meta is not None:
                self.diagnoses.meta_changed(self.get(run_id))
            self.publish_status(run_id)
        else:
            self.finish(run_id, RunStatus(update.status), **fields)
        return self.out(self.get(run_id))

    def finish(self, run_id: str, status: RunStatus, **fields: Any) -> bool:
        """Give a run its final status (unless it has one) and tell its listeners."""
        done = self.store.finish_run(run_id, status.value, **fields)
        self.last_seen.pop(run_id, None)
        self.heard.discard(run_id)
        self.publish_status(run_id)
        return done

    def seen(self, run_id: str) -> None:
        self.last_seen[run_id] = time.monotonic()
        self.heard.add(run_id)

    def reap_silent(self) -> list[str]:
        """Runs whose reporter went silent: a script's run silent for longer than
        ``client_timeout`` becomes failed (the script died or hung); a run trained here whose
        worker sent no heartbeat for ``worker_timeout`` has its worker killed and becomes failed
        (server.scheduler). Returns their ids."""
        now = time.monotonic()
        ended = []
        for run in self.store.runs.search(status=RunStatus.RUNNING.value, limit=10_000)[0]:
            if run["source"] != "client":
                continue
            silent = self._silent_for(run["id"], now)
            if silent > self.settings.client_timeout:
                message = (
                    f"the script stopped reporting: no records, status or heartbeat for "
                    f"{silent:.0f} s (it died, hung, or lost the server)"
                )
                if self.finish(run["id"], RunStatus.FAILED, message=message):
                    ended.append(run["id"])
        for run_id in list(self.scheduler.running):
            silent = self._silent_for(run_id, now)
            # a worker starting (a process, its imports) on a loaded machine says nothing for
            # a while: until its first heartbeat it has WORKER_STARTUP seconds at least
            limit = self.settings.worker_timeout
            if run_id not in self.heard:
                limit = max(limit, WORKER_STARTUP)
            if silent > limit:
                self.scheduler.kill_hung(
                    run_id,
                    f"the worker stopped reporting: no heartbeat for {silent:.0f} s (it hung or "
                    "was stopped); it was killed, its records are kept",
                )
                self.last_seen.pop(run_id, None)
                self.heard.discard(run_id)
                ended.append(run_id)
        return ended

    def _silent_for(self, run_id: str, now: float) -> float:
        """Seconds since the run's reporter last said anything (counted from the first look,
        for a run from before a restart or a worker just started)."""
        return now - self.last_seen.setdefault(run_id, now)

    async def watch_silent(self) -> None:
        """Reap silent runs (:meth:`reap_silent`) every second or so, for as long as the
        server runs."""
        from fastapi.concurrency import run_in_threadpool

        shortest = min(self.settings.client_timeout, self.settings.worker_timeout)
        period = min(1.0, shortest / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await run_in_threadpool(self.reap_silent)
            except Exception:  # a busy database: try again next time
                log.exception("reaping silent runs failed")

    # -- live listeners -----------------------------------------------------------------------

    async def follow(self, run_id: str, after: int | None) -> AsyncGenerator[Event, None]:
        """A run's live events: ``reset`` when the listener missed more than the hub kept, the
        kept batches after sequence number ``after``, the current status, then every batch
        and status change until the run ends."""
        run = self.get(run_id)
        queue, missed = self.hub.subscribe(run_id, after)
        seq = run["seq"]
        try:
            if after is not None and after < seq and not (missed and missed[0].seq == after + 1):
                reason = "missed records are no longer kept for streaming"
                yield Event("reset", seq, {"seq": seq, "reason": reason})
            for event in missed:
                yield event
            yield Event("status", seq, self.out(run))
            if run["status"] in FINISHED:
                return
            while True:
                event = await queue.get()
                if event is GONE:  # too far behind: the client reconnects with Last-Event-ID
                    return
                yield event
                if event.kind == "status" and event.data["status"] in FINISHED:
                    return
        finally:
            self.hub.unsubscribe(run_id, queue)

    def publish_status(self, run_id: str) -> None:
        """Tell live listeners the run's status (from any thread)."""
        run = self.store.runs.get(run_id)
        if run is not None:
            if run["status"] in FINISHED:  # the batches that waited for the doctor: diagnosed
                self.diagnoses.ended(run_id)  # and told before the stream ends
            self.hub.publish(run_id, Event("status", run["seq"], self.out(run)))
            if run["status"] in FINISHED:
                self.hub.publish_ended(run_id)

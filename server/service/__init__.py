"""The service: what BN Scope does, apart from how it is asked (HTTP routes, dashboard clicks).

- ``runs`` (server.service.runs): launch, cancel, delete; take a worker's or script's records
  and status; tell live listeners;
- ``sweeps`` (server.service.sweeps): sweeps and the literature's experiments;
- ``records`` (server.service.records): a run's records read back;
- ``diagnoses`` (server.service.diagnoses): the BN doctor, run on every batch ingested; what it
  found, silencing.

It raises server.errors (NotFound, Conflict, Invalid, ...), which the API turns into HTTP answers
and the dashboard into messages. :func:`build` assembles it from the settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.hub import Hub
from server.scheduler import Scheduler
from server.service.diagnoses import DiagnosisService
from server.service.records import RecordService
from server.service.runs import RunService
from server.service.sweeps import SweepService
from server.settings import Settings
from server.store import Store

__all__ = ["Service", "build"]


@dataclass
class Service:
    settings: Settings
    store: Store
    hub: Hub
    scheduler: Scheduler
    runs: RunService
    sweeps: SweepService
    records: RecordService
    diagnoses: DiagnosisService

    async def start(self, api_url: str) -> None:
        """Start training queued runs (workers report to ``api_url``)."""
        import asyncio

        self.hub.loop = asyncio.get_running_loop()
        self.scheduler.start(api_url)

    async def stop(self) -> None:
        await self.scheduler.stop()
        self.store.close()


def build(settings: Settings) -> Service:
    """The service on the database and scheduler the settings name."""
    store = Store(settings.db_url, settings.durability)
    hub = Hub()
    scheduler = Scheduler(store, settings, on_status=lambda run_id: runs.publish_status(run_id))
    runs = RunService(settings, store, hub, scheduler)
    return Service(settings, store, hub, scheduler, runs, SweepService(runs), RecordService(runs),
                   runs.diagnoses)  # fmt: skip

"""What the routes share: the store, the live hub, the scheduler and the settings, plus the
two things every route needs of them (a run by id, the token check)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import HTTPException, Request
from fastapi.responses import Response

from server.hub import Event, Hub
from server.scheduler import Scheduler
from server.settings import Settings
from server.store import Store


@dataclass
class Services:
    settings: Settings
    store: Store
    hub: Hub
    scheduler: Scheduler
    #: when each script-reported run (bnscope.client) last said anything (time.monotonic())
    last_seen: dict[str, float] = field(default_factory=dict)

    def seen(self, run_id: str) -> None:
        self.last_seen[run_id] = time.monotonic()

    def reap_silent_clients(self) -> list[str]:
        """Script-reported runs silent for longer than ``client_timeout`` become failed (the
        script died or hung); returns their ids."""
        now, limit = time.monotonic(), self.settings.client_timeout
        ended = []
        for run in self.store.list_runs(status="running", limit=10_000)[0]:
            if run["source"] != "client":
                continue
            last = self.last_seen.setdefault(run["id"], now)  # runs from before a restart
            if now - last > limit:
                message = (
                    f"the script stopped reporting: no records, status or heartbeat for "
                    f"{now - last:.0f} s (it died, hung, or lost the server)"
                )
                if self.store.finish_run(run["id"], "failed", message=message):
                    ended.append(run["id"])
                self.last_seen.pop(run["id"], None)
        return ended

    def run_or_404(self, run_id: str) -> dict[str, Any]:
        run = self.store.get_run(run_id)
        if run is None:
            raise HTTPException(404, f"no run with id {run_id!r}")
        return run

    def publish_status(self, run_id: str) -> None:
        """Tell live listeners the run's status (in the event loop's thread)."""
        from server.views import run_out

        run = self.store.get_run(run_id)
        if run is not None:
            self.hub.publish(run_id, Event("status", run["seq"], run_out(run, self)))


def services(request: Request) -> Services:
    return request.app.state.services


def require_token(request: Request) -> None:
    """Mutating calls carry ``Authorization: Bearer <token>`` when the server has a token."""
    token = request.app.state.services.settings.token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), token):
        raise HTTPException(
            401,
            "this server requires 'Authorization: Bearer <token>' on calls that change anything",
            headers={"WWW-Authenticate": "Bearer"},
        )


class JSONResponse(Response):
    """orjson, with numpy arrays and NaN as null: fast for long series."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)

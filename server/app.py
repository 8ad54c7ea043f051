"""The BN Scope server: one FastAPI app, one uvicorn process.

- ``/api/...``: runs, sweeps, records (see server/routes), documented at ``/docs``;
- ``/healthz``: liveness;
- ``/dashboard``: the live dashboard (dashboard package), mounted when it is installed.

Runs train in worker processes (server.scheduler) that report through the same API.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import bncore
from server.hub import Hub
from server.routes import experiments, ingest, runs, sweeps
from server.scheduler import Scheduler
from server.services import Services
from server.settings import Settings
from server.store import Store

log = logging.getLogger("bnscope.server")


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = b'{"detail":"request body larger than %d bytes"}' % self.limit
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def _reap(svc: Services) -> None:
    """Marks script-reported runs that went silent as failed, every second or so."""
    from fastapi.concurrency import run_in_threadpool

    period = min(1.0, svc.settings.client_timeout / 4)
    while True:
        await asyncio.sleep(period)
        try:
            for run_id in await run_in_threadpool(svc.reap_silent_clients):
                svc.publish_status(run_id)
        except Exception:  # a busy database: try again next time
            log.exception("reaping silent client runs failed")


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc: Services = app.state.services
        svc.hub.loop = asyncio.get_running_loop()
        svc.scheduler.start(app.state.api_url)
        reaper = asyncio.create_task(_reap(svc))
        yield
        reaper.cancel()
        await svc.scheduler.stop()
        svc.store.close()

    store = Store(settings.db_url)
    hub = Hub()
    scheduler = Scheduler(store, settings, on_status=lambda run_id: svc.publish_status(run_id))
    svc = Services(settings, store, hub, scheduler)

    app = FastAPI(
        title="BN Scope",
        version=bncore.__version__,
        lifespan=lifespan,
        description="Launch training runs and watch what batch normalization does "
        "inside them, live.",
    )
    app.state.services = svc
    app.state.api_url = settings.public_url or f"http://127.0.0.1:{settings.port}"
    app.include_router(runs.router)
    app.include_router(ingest.router)
    app.include_router(sweeps.router)
    app.include_router(experiments.router)

    @app.get("/healthz", tags=["system"])
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": bncore.__version__,
            "running": len(scheduler.running),
            "queued": len(scheduler.queue),
        }

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/" if app.state.dashboard else "/docs")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(p) for p in e["loc"] if p != "body"),
                "message": e["msg"].removeprefix("Value error, "),
            }
            for e in exc.errors()
        ]
        summary = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return JSONResponse({"detail": errors, "message": summary}, status_code=422)

    app.state.dashboard = _mount_dashboard(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


def _mount_dashboard(app: FastAPI) -> bool:
    try:
        from dashboard.app import mount
    except ImportError:
        return False
    mount(app)
    return True


def serve(settings: Settings, log_level: str = "info") -> None:
    """Run the server until interrupted; port 0 picks a free one (printed)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    settings = settings.model_copy(update={"port": port})
    app = create_app(settings)
    print(
        f"BN Scope on http://{settings.host}:{port}/ (API docs: /docs, data: "
        f"{settings.data_dir.resolve()})",
        flush=True,
    )
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])

"""The BN Scope HTTP API: one FastAPI app on the service (server.service).

- ``/api/...``: runs, sweeps, records (see server/routes), documented at ``/docs``;
- ``/healthz``: liveness.

Runs train in worker processes (server.scheduler) that report through the same API. The
product (API + dashboard on one uvicorn) is assembled by bnscope.app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import bncore
from server.errors import DomainError, Unauthorized
from server.routes import experiments, ingest, runs, sweeps
from server.service import Service


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


def create_api(svc: Service, api_url: str) -> FastAPI:
    """The HTTP API on a service (server.service.build); workers report to ``api_url``. The
    dashboard is mounted on it by whoever assembles the product (bnscope.app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start(api_url)
        reaper = asyncio.create_task(svc.runs.watch_clients())
        yield
        reaper.cancel()
        await svc.stop()

    app = FastAPI(
        title="BN Scope",
        version=bncore.__version__,
        lifespan=lifespan,
        description="Launch training runs and watch what batch normalization does "
        "inside them, live.",
    )
    app.state.service = svc
    app.state.dashboard = False
    for module in (runs, ingest, sweeps, experiments):
        app.include_router(module.router)

    @app.get("/healthz", tags=["system"])
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": bncore.__version__,
            "running": len(svc.scheduler.running),
            "queued": len(svc.scheduler.queue),
        }

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/" if app.state.dashboard else "/docs")

    @app.exception_handler(DomainError)
    async def refused(request: Request, exc: DomainError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

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

    app.add_middleware(BodyLimit, limit=svc.settings.max_body_bytes)
    if svc.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=svc.settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app

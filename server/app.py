"""The BN Scope HTTP API: one FastAPI app on the service (server.service).

- ``/api/...``: runs, sweeps, records (see server/routes), documented at ``/docs`` and
  ``/redoc`` (their scripts served from here: no CDN, the docs work offline);
- ``/healthz``: liveness.

Every refused request (4xx) is answered in one shape (server.errors.error_body):
``{"message": "<what to fix>", "detail": [{"field": "optim.lr", "message": "..."}, ...]}``.

Runs train in worker processes (server.scheduler) that report through the same API. The
product (API + dashboard on one uvicorn) is assembled by bnscope.app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

import bncore
from bncore.run.config import field_errors
from server.errors import BODY_NOT_OBJECT, MAX_LISTED, DomainError, Unauthorized, error_body
from server.middleware import BodyLimit, NoNul, ReadGuard
from server.routes import experiments, ingest, runs, sweeps
from server.schemas import ERROR_RESPONSES
from server.service import Service

log = logging.getLogger("bnscope.server")

#: How the body's validator says the body is not a JSON object (absent, another content type,
#: a list, a number...).
_NOT_AN_OBJECT = {"missing", "model_type", "model_attributes_type", "dict_type"}


def create_api(svc: Service, api_url: str) -> FastAPI:
    """The HTTP API on a service (server.service.build); workers report to ``api_url``. The
    dashboard is mounted on it by whoever assembles the product (bnscope.app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start(api_url)
        reaper = asyncio.create_task(svc.runs.watch_silent())
        yield
        reaper.cancel()
        await svc.stop()

    app = FastAPIOffline(
        title="BN Scope",
        version=bncore.__version__,
        lifespan=lifespan,
        description="Launch training runs and watch what batch normalization does "
        "inside them, live.",
        # no badge from validator.swagger.io: the page loads nothing from elsewhere
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.service = svc
    app.state.dashboard = False
    for module in (runs, ingest, sweeps, experiments):
        app.include_router(module.router, responses=ERROR_RESPONSES)

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
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(sa.exc.DatabaseError)
    async def storage(request: Request, exc: sa.exc.DatabaseError) -> JSONResponse:
        status, message = svc.store.failure(exc)
        log.warning("%s %s: %s", request.method, request.url.path, message)
        return JSONResponse(error_body([{"field": "", "message": message}]), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(exc.errors()), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        where = f"{request.method} {request.url.path}"
        if message == HTTPStatus(404).phrase and exc.status_code == 404:  # starlette's own
            message = f"nothing at {where} (the API's routes are listed at /docs)"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # starlette names the first matching route's methods only
            headers["Allow"] = ", ".join(allowed_methods(app, request)) or headers.get("Allow", "")
            if message == HTTPStatus(405).phrase:
                allowed = headers["Allow"] or "another method"
                message = f"{where} is not allowed; this path takes {allowed}"
        return JSONResponse(
            error_body([{"field": "", "message": message}]),
            status_code=exc.status_code,
            headers=headers,
        )

    app.add_middleware(BodyLimit, limit=svc.settings.max_body_bytes)
    app.add_middleware(NoNul)
    if svc.settings.protect_reads:
        app.add_middleware(ReadGuard, accepts=svc.runs.has_token)
    if svc.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=svc.settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method the API's schema documents at the request's path (a path without
    parameters first, as OpenAPI matches them)."""
    from starlette.routing import compile_path

    paths, path = app.openapi()["paths"], request.url.path
    if path in paths:
        return sorted(m.upper() for m in paths[path])
    methods: set[str] = set()
    for template, operations in paths.items():
        if compile_path(template)[0].match(path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


def validation_body(errors: Any) -> dict[str, Any]:
    """The answer to a request that does not validate: each field with what is wrong with it, in
    the words the CLI uses too (bncore.run.config.field_errors)."""
    detail: list[dict[str, Any]] = []
    errors = list(errors)
    for i, e in enumerate(errors):
        if len(detail) >= MAX_LISTED:  # the rest only counted: the answer costs 20 errors
            return error_body(detail, more=len(errors) - i)
        loc = tuple(e.get("loc") or ())
        if loc == ("body",) and e.get("type") in _NOT_AN_OBJECT:
            detail.append({"field": "", "message": BODY_NOT_OBJECT})
        elif loc[:1] == ("body",) and e.get("type") == "json_invalid":
            why = (e.get("ctx") or {}).get("error") or e.get("msg")
            detail.append({"field": "", "message": f"the body is not valid JSON ({why})"})
        else:
            detail.extend({"field": f, "message": m} for f, m in field_errors([e], strip=("body",)))
    return error_body(detail)

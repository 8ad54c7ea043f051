"""What every route is handed: the service (injected), and the token check on calls that change
anything."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as FastAPIJSONResponse
from fastapi.responses import Response
from fastapi.routing import APIRoute

from server.errors import TooLarge
from server.middleware import read_json
from server.service import Service


def service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(service)]


def require_token(request: Request, svc: Svc) -> None:
    """Mutating calls carry ``Authorization: Bearer <token>`` when the server has a token."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    svc.runs.authorize(given if scheme.lower() == "bearer" else None)


Authorized = [Depends(require_token)]


class JSONResponse(FastAPIJSONResponse):
    """orjson, with numpy arrays and NaN as null: fast for long series."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


class BoundedRoute(APIRoute):
    """A route whose JSON body is parsed off the event loop, with server.middleware.read_json's
    bounds (keys per object, no NUL), before FastAPI validates it: a large or hostile body costs
    its own request time linear in its size, and never holds up the others (``/healthz``, live
    streams). Every router of the API is made of these."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # no JSON body (records are read by their own route)
            return handler

        async def bounded(request: Request) -> Response:
            media = request.headers.get("content-type", "application/json").split(";")[0]
            limit = service(request).settings.max_config_bytes
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(int(declared), limit)
            body = await request.body()
            if len(body) > limit:
                raise _too_large(len(body), limit)
            if body and (media.strip() == "application/json" or media.endswith("+json")):
                try:
                    parsed = await run_in_threadpool(read_json, body)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # as FastAPI says it
                    why, at = (
                        (exc.msg, exc.pos)
                        if isinstance(exc, json.JSONDecodeError)
                        else ("not UTF-8 text", exc.start)
                    )
                    raise RequestValidationError(
                        [{"type": "json_invalid", "loc": ("body", at),
                          "msg": "JSON decode error", "input": {}, "ctx": {"error": why}}]
                    ) from None  # fmt: skip
                request._json = parsed  # starlette's cache of Request.json(): FastAPI reads it
            return await handler(request)

        return bounded


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(
        f"the body is {size} bytes; this call takes at most {limit} (--max-config-bytes; "
        "records have their own limit, --max-body-bytes)"
    )

"""What every route is handed: the service (injected), and the token check on calls that change
anything."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.responses import JSONResponse as FastAPIJSONResponse

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

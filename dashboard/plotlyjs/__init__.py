"""The plotly.js the dashboard and the report draw with: plotly.js's own "cartesian" partial
bundle (scatter, heatmap, bar and the rest of the 2-D traces: every figure BN Scope draws),
1.5 MB against the full bundle's 4.8 MB that Dash would otherwise load after the first
callback; the same version as the full bundle of the plotly package it was taken with
(npm ``plotly.js-cartesian-dist-min``, MIT, LICENSE beside it).

The dashboard's page loads it with its own scripts (dcc.Graph draws with ``window.Plotly``
when it is there, and loads nothing more), from an address that names its version, served
gzipped with a year's immutable cache; the report inlines it, to open offline.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

VERSION = "4.1.1"
FILE = Path(__file__).with_name(f"plotly-cartesian-{VERSION}.min.js")
#: Where the page loads it from: a new version is a new address, so it can be cached for good.
ADDRESS = f"/dashboard/plotly-cartesian-{VERSION}.min.js"
CACHED = "public, max-age=31536000, immutable"


@cache
def source() -> str:
    """The bundle's script."""
    return FILE.read_text(encoding="utf-8")


@cache
def _gzipped() -> bytes:
    return gzip.compress(source().encode("utf-8"), compresslevel=9, mtime=0)


def script_tag() -> str:
    """The page's tag that loads it, before Dash's own scripts (so it is there when the first
    figure is drawn)."""
    return f'<script src="{ADDRESS}"></script>'


def serve_plotlyjs(app: FastAPI) -> None:
    """``GET`` :data:`ADDRESS` on the API's app (registered before the dashboard's mount)."""

    def plotlyjs(request: Request) -> Response:
        """plotly.js, gzipped where the browser takes it, cached for a year."""
        headers = {"cache-control": CACHED, "vary": "accept-encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["content-encoding"] = "gzip"
            return Response(_gzipped(), media_type="text/javascript", headers=headers)
        return Response(source(), media_type="text/javascript", headers=headers)

    app.add_api_route(ADDRESS, plotlyjs, methods=["GET"], include_in_schema=False)

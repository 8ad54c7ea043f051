"""The plotly.js the dashboard and the report draw with: plotly.js's own "cartesian" partial
bundle (npm ``plotly.js-cartesian-dist-min``, MIT, LICENSE beside it; the same version as the
full bundle of the plotly package it was taken with), 1.5 MB against the full bundle's 4.8 MB
that Dash would otherwise load after the first callback, with only the trace types BN Scope
draws registered (:data:`TRACES`): the others' modules (bar, box, histograms, contours, image,
pie, ...) are never run, which took a fifth of the page's first second.

The dashboard's page loads it with its own scripts (dcc.Graph draws with ``window.Plotly``
when it is there, and loads nothing more), from an address that names its version and its
traces, served gzipped with a year's immutable cache; the report inlines it, to open offline.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

VERSION = "4.1.1"
FILE = Path(__file__).with_name(f"plotly-cartesian-{VERSION}.min.js")
#: The trace types BN Scope draws (dashboard.figures.factory): scatter is plotly's core.
TRACES = ("scatter", "heatmap")
#: The bundle's own registration of its twelve modules, and the one kept: ``xJ`` is heatmap's
#: in this build (tests/dashboard/test_figures.py reads it from the bundle).
REGISTERED = "register([hZ(),e$(),xJ(),HJ(),rK(),aQ(),yQ(),oee(),Fee(),lse(),Kse(),Cue()])"
DRAWN = "register([xJ()])"
#: V8's compile hint (Chrome 136+; a comment elsewhere): compile every function as the script
#: downloads, on another thread, not each one on the page's thread when plotly.js first runs
#: it (a parse of its 1.5 MB factory alone took 140 ms there). The page loads it after Dash's
#: scripts, so that this compiling overlaps with running theirs.
EAGER = "//# allFunctionsCalledOnLoad\n"
#: Where the page loads it from: a new version, or other traces, is a new address, so it can
#: be cached for good.
ADDRESS = f"/dashboard/plotly-{VERSION}-{'-'.join(TRACES)}.min.js"
CACHED = "public, max-age=31536000, immutable"


@cache
def source() -> str:
    """The bundle's script, registering :data:`TRACES` only."""
    bundle = FILE.read_text(encoding="utf-8")
    if bundle.count(REGISTERED) != 1:
        raise RuntimeError(f"{FILE.name} does not register its traces as plotlyjs expects")
    return bundle.replace(REGISTERED, DRAWN)


@cache
def served() -> str:
    """The bundle as the dashboard's page loads it: marked for compiling as it downloads
    (:data:`EAGER`)."""
    return EAGER + source()


@cache
def _gzipped() -> bytes:
    return gzip.compress(served().encode("utf-8"), compresslevel=9, mtime=0)


def script_tag() -> str:
    """The page's tag that loads it, before Dash's renderer starts (so it is there when the
    first figure is drawn)."""
    return f'<script src="{ADDRESS}"></script>'


def serve_plotlyjs(app: FastAPI) -> None:
    """``GET`` :data:`ADDRESS` on the API's app (registered before the dashboard's mount)."""

    def plotlyjs(request: Request) -> Response:
        """plotly.js, gzipped where the browser takes it, cached for a year."""
        headers = {"cache-control": CACHED, "vary": "accept-encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["content-encoding"] = "gzip"
            return Response(_gzipped(), media_type="text/javascript", headers=headers)
        return Response(served(), media_type="text/javascript", headers=headers)

    app.add_api_route(ADDRESS, plotlyjs, methods=["GET"], include_in_schema=False)

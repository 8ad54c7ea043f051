"""The dashboard: a Dash app in the server's process, at /dashboard, built from its views
(dashboard.views: each its layout and its callbacks) and mounted beside the API.

Tabs: Runs (the list; pick one or several), Run (one run, live), Compare (runs overlaid),
Launch (a form generated from the run config, with presets), Experiments, BN calculator. The
run view is fed by push: assets/live.js listens to the run's Server-Sent Events and extends the
figures in the browser (dcc.Graph extendData), so nothing is reloaded while a run trains.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import flask
import plotly.io as pio
from a2wsgi import WSGIMiddleware
from dash import Dash, dcc, html
from fastapi import FastAPI

from bncore.status import ACTIVE, FINISHED
from dashboard import glossary, plotlyjs, report, wiring
from dashboard.kept import KeptScripts
from dashboard.views import (
    address,
    calculator,
    compare,
    doctor,
    experiments,
    launch,
    run,
    runs,
)
from dashboard.views.common import tabs
from server.service import Service

#: Every view with callbacks, bound to the service at mount.
VIEWS = (address, runs, run, doctor, compare, launch, experiments, calculator)
#: The page's state, shared by the views' callbacks (and assets/live.js), each with its value
#: while it holds nothing: never None, which a memory dcc.Store replaces as it mounts, firing
#: every callback it feeds, and holding back the run's figures until they have answered.
STORES: dict[str, Any] = {
    "view-run": "", "compare-runs": [], "live-spec": {}, "following": "", "live-status": {},
    "live-reset": 0, "live-conn": "", "watching": "", "want-layer": "", "delete-ids": [],
    "runs-changed": 0, "server-back": 0, "live-diagnosis": 0, "doctor-changed": 0,
    "want-step": {},
}  # fmt: skip
#: What the page's script (assets/live.js) shares with the server: the run-status vocabulary.
PAGE_VOCABULARY = {"active": list(ACTIVE), "finished": list(FINISHED)}
#: What the page asks for while its scripts load, not after: its layout (a link's run drawn in
#: it: the longest answer) and the chunk that draws figures (dcc.Graph's, loaded on first use).
EARLY = (
    '<link rel="preload" href="/dashboard/_dash-layout" as="fetch" crossorigin="anonymous">'
    '<link rel="preload" href="/dashboard/_dash-component-suites/dash/dcc/async-graph.js" '
    'as="script">'
)


def layout(svc: Service, search: str | None = None) -> html.Div:
    """The page, opened on the view its link names (``search``: the address's ``?a=1&b=2``)
    and already drawn: a link's run comes with its figures, banner and diagnosis in the page
    (wiring.fill), so they are drawn as the page mounts, with no round of callbacks first."""
    view = address.view_of(address.query_of(search))
    initial: dict[str, Any] = {
        "view-run": view.run, "compare-runs": view.compare, "want-layer": view.layer
    }  # fmt: skip
    if view.step is not None and view.run:  # a step to mark (dashboard.views.doctor)
        initial["want-step"] = {"run": view.run, "layer": view.layer, "step": view.step,
                                "mark": view.mark}  # fmt: skip
    header = html.Header(
        [
            html.H1("BN Scope"),
            html.Span("what batch normalization does inside a network, live", className="note"),
        ]
    )
    views = [
        dcc.Tab(runs.layout(), label="Runs", value="runs"),
        dcc.Tab(run.layout(view.section), label="Run", value="run"),
        dcc.Tab(compare.layout(), label="Compare", value="compare"),
        dcc.Tab(launch.layout(bool(svc.settings.token)), label="Launch", value="launch"),
        dcc.Tab(experiments.layout(), label="Experiments", value="experiments"),
        dcc.Tab(calculator.layout(), label="BN calculator", value="calculator"),
    ]
    page = html.Div(
        [
            header,
            html.Div(id="conn-banner", className="conn-banner", role="status"),
            tabs("tabs", view.tab or "runs", views),
            dcc.ConfirmDialog(id="confirm-delete"),
            # the address as the page has it: nothing changes when it mounts (a change would
            # fire the callbacks that read it, and hold back the figures until they answer)
            dcc.Location(id="url", refresh=False, search=search or ""),
            *(dcc.Store(id=i, data=initial.get(i) or empty) for i, empty in STORES.items()),
        ]
    )
    # the run view as its callbacks draw it (the link's run, or none), in the page itself:
    # they are not called as it mounts
    section = view.section or "overview"
    drawn = run.render_run(svc, view.run, None, None, section, view.layer, initial.get("want-step"))
    wiring.fill(page, run.render_run, drawn)
    wiring.fill(page, doctor.show_doctor, doctor.show_doctor(svc, view.run))
    return page


def page_search() -> str | None:
    """The page's ``?a=1&b=2``, read when Dash asks for its layout: that request
    (``_dash-layout``) carries none, but names the page it is for (its Referer); None where it
    does not (the address is then read once the page has mounted)."""
    if not flask.has_request_context() or not flask.request.referrer:
        return None
    query = urlsplit(flask.request.referrer).query
    return f"?{query}" if query else ""


def mount(app: FastAPI, svc: Service) -> None:
    """Build the Dash app on the service and mount it at /dashboard of the API's app."""
    pio.json.config.default_engine = "orjson"  # Dash encodes figures through plotly.io
    dash_app = Dash(
        __name__,
        requests_pathname_prefix="/dashboard/",
        routes_pathname_prefix="/",
        title="BN Scope",
        suppress_callback_exceptions=True,
        update_title=None,  # type: ignore[arg-type]  # None: no 'Updating...' title
    )
    vocabulary = f"<script>window.bnscopeVocabulary = {json.dumps(PAGE_VOCABULARY)};</script>"
    # plotly.js after Dash's scripts, before the renderer starts: Chrome compiles it on another
    # thread while the page runs theirs (dashboard.plotlyjs.EAGER)
    dash_app.index_string = dash_app.index_string.replace("{%css%}", EARLY + "{%css%}").replace(
        "{%scripts%}", vocabulary + "{%scripts%}" + plotlyjs.script_tag()
    )
    dash_app.layout = lambda: layout(svc, page_search())
    wiring.bind(dash_app, svc, VIEWS)
    report.register(app, svc)
    glossary.serve_statistics_page(app)
    plotlyjs.serve_plotlyjs(app)
    # a2wsgi types its ASGI callable apart from Starlette's; they are the same protocol
    # (Dash's scripts answered from memory, gzipped, from their first request on)
    app.mount("/dashboard", KeptScripts(WSGIMiddleware(dash_app.server)))  # type: ignore[arg-type]

"""The dashboard: a Dash app in the server's process, at /dashboard.

Tabs: Runs (the list; pick one or several), Run (one run, live), Compare (runs overlaid),
Launch (a form generated from the run config, with presets). The run view is fed by push:
assets/live.js listens to the run's Server-Sent Events and extends the figures in the browser
(dcc.Graph extendData), so nothing is reloaded while a run trains.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import flask
import plotly.io as pio
from a2wsgi import WSGIMiddleware
from dash import Dash, dash_table, dcc, html
from fastapi import FastAPI

from bncore.status import ACTIVE, FINISHED
from dashboard import calculator, callbacks, experiments, report
from dashboard.figures.compare import STAT_LABELS
from dashboard.form import PRESETS, build_form
from server.service import Service

# The run view's sections: only the open one is drawn (and fed live), so opening a run or
# streaming into it costs a handful of figures, however many there are in all.
SECTIONS = {
    "overview": ("fig-loss", "fig-acc", "fig-heat-var", "fig-heat-mean", "fig-depth",
                 "fig-channels"),
    "layer": ("fig-layer", "fig-affine", "fig-grads", "fig-scale", "fig-replicas", "fig-pct"),
    "gradients": ("fig-heat-grad", "fig-heat-sat", "fig-depth-2"),
    "population": ("fig-population", "fig-signal"),
}  # fmt: skip
SECTION_LABELS = {
    "overview": "Overview",
    "layer": "One layer",
    "gradients": "Gradients and saturation",
    "population": "Population statistics and signal",
}
STATUS_COLUMNS = {"id": "id", "name": "name", "status": "status", "progress": "progress",
                  "created": "created", "duration": "duration", "eta": "queue / ETA",
                  "model": "model", "norm": "norm", "test_acc": "test acc",
                  "message": "message"}  # fmt: skip


#: Figures of two stacked panels: drawn taller.
TALL = ("fig-layer", "fig-affine", "fig-scale", "fig-replicas", "fig-channels")


def _graph(gid: str) -> dcc.Graph:
    """A figure that fills its cell's width (the height comes from the stylesheet)."""
    cls = "graph tall" if gid in TALL else "graph"
    return dcc.Graph(id=gid, config={"displaylogo": False, "responsive": True}, className=cls)


def _tabs(tab_id: str, value: str, children: list[dcc.Tab]) -> dcc.Tabs:
    """Tabs that stay one compact, scrollable row on a phone (no stacked menu)."""
    return dcc.Tabs(
        id=tab_id,
        value=value,
        children=children,
        mobile_breakpoint=0,
        className="tabs",
        parent_className="tabs-row",
    )


def layout(has_token: bool, query: Mapping[str, str] | None = None) -> html.Div:
    """The page, opened on the view its link names (``query``: the address's parameters), so
    the first drawing is already the right one."""
    view = callbacks.view_of(dict(query or {}), tuple(SECTIONS))
    runs_tab = html.Div(
        [
            html.Div(
                [
                    html.Button("Open", id="open-run", n_clicks=0, className="primary"),
                    html.Button("Compare", id="open-compare", n_clicks=0),
                    html.Button("Cancel", id="cancel-runs", n_clicks=0),
                    html.Button("Delete", id="delete-runs", n_clicks=0, className="danger"),
                    html.Span("tick runs, then act on them", className="note"),
                    html.Span(id="runs-note", className="note action-note"),
                ],
                className="toolbar",
            ),
            dash_table.DataTable(  # type: ignore[attr-defined]  # generated at import
                id="runs-table",
                columns=[{"name": v, "id": k} for k, v in STATUS_COLUMNS.items()],
                data=[],
                row_selectable="multi",
                selected_rows=[],
                page_size=25,
                sort_action="native",
                style_table={"overflowX": "auto", "minWidth": "100%"},
                style_cell={
                    "textAlign": "left",
                    "fontSize": 13,
                    "maxWidth": 360,
                    "whiteSpace": "normal",
                    "height": "auto",
                },
                style_data_conditional=[
                    {"if": {"filter_query": f'{{status}} = "{s}"'}, "color": c}
                    for s, c in (
                        ("diverged", "#b45309"),
                        ("failed", "#b91c1c"),
                        ("interrupted", "#7c3aed"),
                        ("running", "#047857"),
                    )
                ],
            ),
            dcc.Interval(id="runs-refresh", interval=2000),
        ]
    )
    run_tab = html.Div(
        [
            html.Div(id="run-banner", className="banner"),
            html.Div(
                [
                    html.Button("Cancel run", id="run-cancel", n_clicks=0),
                    html.Button("Delete run", id="run-delete", n_clicks=0, className="danger"),
                    html.A(
                        "Report (HTML)",
                        id="run-report",
                        href="",
                        target="_blank",
                        className="button-link",
                    ),
                    html.Span(id="live-indicator", className="note"),
                    html.Span(id="run-note", className="note action-note"),
                ],
                className="toolbar",
            ),
            _tabs(
                "section",
                view.section or "overview",
                [
                    dcc.Tab(
                        html.Div(
                            [
                                *(
                                    [
                                        html.Div(
                                            [
                                                html.Label("Layer"),
                                                dcc.Dropdown(
                                                    id="layer-select",
                                                    clearable=False,
                                                    style={"width": "260px"},
                                                ),
                                            ],
                                            className="toolbar",
                                        )
                                    ]
                                    if name == "layer"
                                    else []
                                ),
                                html.Div([_graph(g) for g in graphs], className="grid"),
                            ]
                        ),
                        label=SECTION_LABELS[name],
                        value=name,
                    )
                    for name, graphs in SECTIONS.items()
                ],
            ),
        ]
    )
    compare_tab = html.Div(
        [
            html.Div(
                [
                    html.Label("Statistic"),
                    dcc.Dropdown(
                        id="cmp-stat",
                        value="pre_var",
                        clearable=False,
                        options=[{"label": v, "value": k} for k, v in STAT_LABELS.items()],
                        style={"width": "280px"},
                    ),
                    html.Label("Layer"),
                    dcc.Dropdown(id="cmp-layer", clearable=False, style={"width": "180px"}),
                    html.Span("runs without that layer show their last one", className="note"),
                ],
                className="toolbar",
            ),
            html.Div(
                "Tick two or more runs in the Runs tab and press Compare.",
                id="cmp-note",
                className="banner",
            ),
            html.Div(
                [_graph(g) for g in ("cmp-loss", "cmp-acc", "cmp-stat-fig")],
                id="cmp-figures",
                className="grid",
                style={"display": "none"},
            ),
        ]
    )
    launch_tab = html.Div(
        [
            html.Div(
                [
                    html.Label("Preset"),
                    dcc.Dropdown(
                        id="preset",
                        options=list(PRESETS),
                        placeholder="a single run",
                        style={"width": "320px"},
                    ),
                    html.Div(
                        [
                            html.Label("Sweep over (JSON: field -> values)"),
                            dcc.Textarea(id="grid", value="", className="grid-box"),
                            html.Div(id="grid-err", className="field-error"),
                        ]
                    ),
                    *(
                        [dcc.Input(id="token", type="password", placeholder="server token")]
                        if has_token
                        else [dcc.Input(id="token", type="hidden", value="")]
                    ),
                    html.Button("Launch", id="launch", n_clicks=0, className="primary"),
                ],
                className="toolbar",
            ),
            html.Div(id="launch-result", className="banner"),
            html.Div(build_form(), id="form-box"),
        ]
    )
    initial = {"view-run": view.run, "compare-runs": view.compare, "want-layer": view.layer}
    return html.Div(
        [
            html.Header(
                [
                    html.H1("BN Scope"),
                    html.Span(
                        "what batch normalization does inside a network, live", className="note"
                    ),
                ]
            ),
            html.Div(id="conn-banner", className="conn-banner", role="status"),
            _tabs(
                "tabs",
                view.tab or "runs",
                [
                    dcc.Tab(runs_tab, label="Runs", value="runs"),
                    dcc.Tab(run_tab, label="Run", value="run"),
                    dcc.Tab(compare_tab, label="Compare", value="compare"),
                    dcc.Tab(launch_tab, label="Launch", value="launch"),
                    dcc.Tab(experiments.tab(), label="Experiments", value="experiments"),
                    dcc.Tab(calculator.tab(), label="BN calculator", value="calculator"),
                ],
            ),
            dcc.ConfirmDialog(id="confirm-delete"),
            dcc.Location(id="url", refresh=False),
            *(
                dcc.Store(id=i, data=initial.get(i))
                for i in (
                    "view-run",
                    "compare-runs",
                    "live-spec",
                    "following",
                    "live-status",
                    "live-reset",
                    "live-conn",
                    "watching",
                    "want-layer",
                    "delete-ids",
                    "runs-changed",
                    "server-back",
                )
            ),
        ]
    )


#: What the page's script (assets/live.js) shares with the server: the run-status vocabulary.
PAGE_VOCABULARY = {"active": list(ACTIVE), "finished": list(FINISHED)}


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
    dash_app.index_string = dash_app.index_string.replace("{%scripts%}", vocabulary + "{%scripts%}")
    has_token = bool(svc.settings.token)
    dash_app.layout = lambda: layout(
        has_token, flask.request.args if flask.has_request_context() else None
    )
    callbacks.register(dash_app, svc, SECTIONS)
    experiments.register(dash_app, svc)
    calculator.register(dash_app)
    report.register(app, svc)
    # a2wsgi types its ASGI callable apart from Starlette's; they are the same protocol
    app.mount("/dashboard", WSGIMiddleware(dash_app.server))  # type: ignore[arg-type]

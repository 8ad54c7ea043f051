"""Runs overlaid: loss, test accuracy, and one statistic at one layer position (a run without
that layer shows its last one)."""

from __future__ import annotations

import logging
from typing import Any

from dash import Input, Output, dcc, html, no_update

from dashboard import data
from dashboard.figures.compare import STAT_LABELS, compare_figures
from dashboard.views.common import failed, graph
from dashboard.wiring import callback
from server.service import Service

log = logging.getLogger(__name__)
HINT = "Tick two or more runs in the Runs tab and press Compare."
FIGURES = ("cmp-loss", "cmp-acc", "cmp-stat-fig")


def layout() -> html.Div:
    """The Compare tab: hidden figures until there are runs to compare."""
    toolbar = [
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
    ]
    return html.Div(
        [
            html.Div(toolbar, className="toolbar"),
            html.Div(HINT, id="cmp-note", className="banner"),
            html.Div(
                [graph(g) for g in FIGURES],
                id="cmp-figures",
                className="grid",
                style={"display": "none"},
            ),
        ]
    )


@callback(
    *[Output(g, "figure") for g in FIGURES],
    Output("cmp-layer", "options"),
    Output("cmp-layer", "value"),
    Output("cmp-note", "children"),
    Output("cmp-figures", "style"),
    Input("compare-runs", "data"),
    Input("cmp-stat", "value"),
    Input("cmp-layer", "value"),
)
def compare(
    svc: Service, run_ids: list[str] | None, stat: str, layer: str | None
) -> tuple[Any, ...]:
    """The runs' figures, the layers to pick from (the chosen one kept where a run has it),
    and a note on which runs these are (and which ids name no run)."""
    if not run_ids:
        return (no_update,) * 5 + (HINT, {"display": "none"})
    try:
        runs, missing = data.compare_view(svc, run_ids, stat, layer)
        figs = compare_figures(runs, stat)
    except Exception as exc:
        log.exception("compare view")
        return (no_update,) * 5 + (failed(str(exc)), no_update)
    note: list[Any] = [f"Comparing {len(runs)} run(s): {', '.join(r['id'] for r in runs)}."]
    if missing:
        note = failed(
            f"no run with id {', '.join(map(repr, missing))} (deleted, or a mistyped "
            f"link); comparing the other {len(runs)}.",
            "not found",
        )
    if not runs:
        return (no_update,) * 5 + (note, {"display": "none"})
    layers = list(dict.fromkeys(name for r in runs for name in r["layers"]))
    chosen_layer = layer if layer in layers else runs[0]["layer"]
    return (*[figs[g] for g in FIGURES], layers, chosen_layer, note, {})

"""One run: its sections of figures, drawn from the store when opened (dashboard.data,
dashboard.figures.run) and fed live in the browser (assets/live.js follows the live spec sent
with them); its banner; cancel, delete (dashboard.views.runs) and its report."""

from __future__ import annotations

import logging
import time
from typing import Any

from dash import ClientsideFunction, Input, Output, State, dcc, html, no_update

from bncore.status import FINISHED, RunStatus
from dashboard import data
from dashboard.figures.factory import has_data, mark_step, nothing, waiting
from dashboard.figures.run import about, run_figures
from dashboard.views.common import captioned, failed, tabs
from dashboard.wiring import Clientside, callback
from server.errors import NotFound
from server.service import Service

log = logging.getLogger(__name__)
HIDDEN = {"display": "none"}

# The sections: only the open one is drawn (and fed live), so opening a run or streaming into
# it costs a handful of figures, however many there are in all.
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
GRAPHS = [g for section in SECTIONS.values() for g in section]
#: Figures of what only some runs have: hidden on a run without it (a distributed run's
#: replicas), rather than taking a panel of every run to say so.
ONLY_IF_RECORDED = ("fig-replicas",)


def layout(section: str | None) -> html.Div:
    """The Run tab, open on ``section`` (the overview if None); what it shows is filled in by
    render_run and show_doctor, in the page's layout (dashboard.app.layout) and then live."""
    layer_select = html.Div(
        [
            html.Label("Layer"),
            dcc.Dropdown(id="layer-select", clearable=False, style={"width": "260px"}),
        ],
        className="toolbar",
    )
    sections = [
        dcc.Tab(
            html.Div(
                [
                    *([layer_select] if name == "layer" else []),
                    html.Div([captioned(g, about(g)) for g in graphs], className="grid"),
                ]
            ),
            label=SECTION_LABELS[name],
            value=name,
        )
        for name, graphs in SECTIONS.items()
    ]
    toolbar = [
        html.Button("Cancel run", id="run-cancel", n_clicks=0),
        html.Button("Delete run", id="run-delete", n_clicks=0, className="danger"),
        html.A("Report (HTML)", id="run-report", href="", target="_blank", className="button-link"),
        html.Span(id="live-indicator", className="note"),
        html.Span(id="run-note", className="note action-note"),
    ]
    return html.Div(
        [
            html.Div(id="run-banner", className="banner"),
            html.Div(toolbar, className="toolbar"),
            html.Div(id="doctor-panel", className="doctor"),  # dashboard.views.doctor
            tabs("section", section or "overview", sections),
        ]
    )


def starting(run: dict[str, Any]) -> str:
    """What a run with no record yet is doing (the first seconds of a launch: a fresh worker
    imports torch and builds its network and data before its first step)."""
    status = run["status"]
    if status == RunStatus.QUEUED.value:
        if run.get("queued_for") == "workers":
            return (
                "queued: the server's workers are starting (loading PyTorch, once; on a "
                "new machine, building BN Scope's CPU kernel too: about 30 s)"
            )
        position = run.get("queue_position")
        where = f" (#{position + 1} in the queue)" if position is not None else ""
        return f"queued{where}: it starts when a worker is free"
    if status == RunStatus.RUNNING.value:
        if run.get("source") == "client":
            return "waiting for the script's first records (run.log)"
        if not (run.get("meta") or {}).get("layers"):
            return "the worker is starting: loading PyTorch, the network and the data"
        return "the worker has started: waiting for the first records"
    return f"the run ended ({status}) before its first record"


def banner(run: dict[str, Any] | None, error: str | None = None) -> list[Any]:
    """What the run is (status, name, id, step, queue, accuracy, message), or the error."""
    if error:
        return failed(error)
    if run is None:
        return ["Pick a run in the Runs tab (click its name), or launch one."]
    total = run.get("steps_total")
    parts: list[Any] = [
        html.Span(run["status"], className=f"status status-{run['status']}", id="run-status"),
        html.B(run.get("name") or run["id"]),
        f"  ·  id {run['id']}  ·  step ",
        html.Span(str(run["steps_done"]), id="run-step"),
        f" of {total}" if total else "",
    ]
    if not run["steps_done"] and run["status"] != RunStatus.QUEUED.value:
        parts.append(html.Span(f"  ·  {starting(run)}", id="run-starting"))
    if run.get("queue_position") is not None:
        parts.append(f"  ·  waiting: #{run['queue_position'] + 1} in the queue")
    final = run.get("final") or {}
    if "test_acc" in final:
        parts.append(f"  ·  test accuracy {final['test_acc']:.4f}")
    if run.get("message"):
        parts.append(html.Pre(run["message"], id="run-message"))
    return parts


@callback(
    *[Output(g, "figure") for g in GRAPHS],
    Output("live-spec", "data"),
    Output("layer-select", "options"),
    Output("layer-select", "value"),
    Output("run-banner", "children"),
    Output("run-report", "href"),
    *[Output(f"cell-{g}", "style") for g in ONLY_IF_RECORDED],
    Output("run-cancel", "disabled"),
    Input("view-run", "data"),
    Input("layer-select", "value"),
    Input("live-reset", "data"),
    Input("section", "value"),
    State("want-layer", "data"),
    Input("want-step", "data"),
    prevent_initial_call=True,  # a link's run comes drawn with the page (dashboard.app.layout)
)
def render_run(
    svc: Service,
    run_id: str | None,
    layer: str | None,
    _reset: Any,
    section: str,
    wanted: str | None,
    marked: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """The open section's figures, fresh from the store, and what feeds them live; a step a
    link marked (``marked``: dashboard.views.doctor.step_from_link) drawn on those over steps."""
    keep = [no_update] * len(GRAPHS)
    hidden = [HIDDEN] * len(ONLY_IF_RECORDED)
    if not run_id:
        return *keep, no_update, [], None, banner(None), "", *hidden, True
    try:
        view = data.run_view(svc, run_id, layer or wanted)
        figs, specs = run_figures(view)
    except NotFound:
        empty = [nothing("no run to show") for _ in GRAPHS]
        message = (
            f"there is no run with id {run_id!r} (deleted, or a mistyped link): pick one "
            "in the Runs tab"
        )
        return *empty, None, [], None, banner(None, message), "", *hidden, True
    except Exception as exc:
        log.exception("run view")
        return (*keep, no_update, no_update, no_update, banner(None, f"{exc}"), no_update,
                *[no_update] * len(ONLY_IF_RECORDED), no_update)  # fmt: skip
    shown = set(SECTIONS.get(section, ()))
    run = svc.runs.out(view["run"])
    note = "" if view["last_step"] else starting(run)
    for g in shown & set(figs) if note else ():
        waiting(figs[g], note)
    if marked and marked.get("run") == run_id and marked.get("step") is not None:
        label = f"{marked.get('mark') or 'step'} at step {marked['step']}"
        for g in shown & set(figs):
            mark_step(figs[g], int(marked["step"]), label)
    out = [figs.get(g, no_update) if g in shown else no_update for g in GRAPHS]
    spec = {
        "run": run_id,
        "specs": [s for s in specs if s["graph"] in shown],
        "layers": view["layers"],
        "waiting": note,  # assets/live.js redraws all at the first records
        "status": run["status"],  # drawn once more when it ends (live_status), not before
    }
    report = f"/api/runs/{run_id}/report"
    shown_if = [None if g in figs and has_data(figs[g]) else HIDDEN for g in ONLY_IF_RECORDED]
    ended = run["status"] in FINISHED
    return (*out, spec, view["layers"], view["layer"], banner(run), report, *shown_if, ended)


@callback(
    Output("run-banner", "children", allow_duplicate=True),
    Output("live-reset", "data", allow_duplicate=True),
    Output("run-cancel", "disabled", allow_duplicate=True),
    Input("live-status", "data"),
    State("live-spec", "data"),
    prevent_initial_call=True,
    service=False,
)
def live_status(run: dict[str, Any] | None, spec: dict[str, Any] | None) -> tuple[Any, ...]:
    """The stream said the run's status: the banner says it (Cancel too, disabled once it has
    ended); the figures are drawn again from the store once the worker has said which layers
    it has, or the run has ended since they were drawn (the final per-channel arrays,
    everything the stream did not carry; a run that had already ended is not drawn twice), or,
    before its first record, what it is doing has changed (queued, then its worker starting)."""
    if not run:
        return no_update, no_update, no_update
    ended = run["status"] in FINISHED
    spec = spec or {}
    if spec.get("run") != run.get("id"):  # its drawing is on its way, from the store as it is
        return banner(run), no_update, ended
    layers_known = bool((run.get("meta") or {}).get("layers"))
    waiting = spec.get("waiting")
    redraw = (
        (layers_known and bool(spec) and not spec.get("layers"))
        or (ended and spec.get("status") not in FINISHED)
        or bool(waiting and not run["steps_done"] and starting(run) != waiting)  # the news
    )
    return banner(run), (time.time() if redraw else no_update), ended


@callback(
    Output("live-reset", "data", allow_duplicate=True),
    Input("server-back", "data"),
    State("view-run", "data"),
    prevent_initial_call=True,
    service=False,
)
def server_back(_back: Any, run_id: str | None) -> Any:
    """The server is reachable again: redraw what it may have changed meanwhile."""
    return time.time() if run_id else no_update


#: assets/live.js opens the viewed run's event stream ...
WATCH = Clientside(
    ClientsideFunction("bnscope", "watch"), Output("watching", "data"), (Input("view-run", "data"),)
)
#: ... and feeds the figures as the live spec says.
FOLLOW = Clientside(
    ClientsideFunction("bnscope", "follow"),
    Output("following", "data"),
    (Input("live-spec", "data"),),
)

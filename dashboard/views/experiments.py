"""The Experiments tab: one button per experiment of bncore.science.experiments, and the result
view of the sweep it starts (the literature's sentence, whether this measurement agrees with it and
in what numbers, above the measurement and, where there is one, the theory). The view refreshes
every 2 s until the sweep's last run finishes."""

from __future__ import annotations

from typing import Any

from dash import ALL, Input, Output, State, dcc, html, no_update

from bncore.science.experiments import EXPERIMENTS
from dashboard.figures.experiment import experiment_figure
from dashboard.views.address import query_of
from dashboard.views.common import NEEDS_TOKEN, failed
from dashboard.wiring import callback
from server.errors import DomainError, Unauthorized
from server.service import Service


def layout() -> html.Div:
    """The Experiments tab: a card per experiment, and the result of one picked."""
    cards = [
        html.Div(
            [
                html.H3(e.title),
                html.P(e.claim),
                html.P(e.note, className="note") if e.note else None,
                html.Button(
                    f"Run it ({e.runs()} runs)",
                    id={"type": "exp-run", "key": e.key},
                    n_clicks=0,
                    className="primary",
                ),
            ],
            className="card",
        )
        for e in EXPERIMENTS.values()
    ]
    return html.Div(
        [
            html.Div(
                [
                    html.Label("Result of"),
                    dcc.Dropdown(
                        id="exp-pick", placeholder="an experiment you ran", style={"width": "480px"}
                    ),
                ],
                className="toolbar",
            ),
            html.Div(id="exp-head", className="banner"),
            html.Div(id="exp-figures", className="panels"),
            html.Div(cards, className="cards"),
            dcc.Interval(id="exp-refresh", interval=2000, disabled=True),
        ]
    )


def verdict(found: dict[str, Any] | None, done: bool) -> html.P:
    """Whether this measurement agrees with the paper, and what it measured."""
    if found is None:
        text = "runs still to finish" if not done else "not measured: a run has no records"
        return html.P([html.Span("pending", className="status status-queued"), text],
                      className="verdict")  # fmt: skip
    tag, cls = ("agrees", "verdict-yes") if found["agrees"] else ("disagrees", "verdict-no")
    so_far = "" if done else " (so far: runs still to finish)"
    return html.P([html.Span(tag, className=f"status {cls}"), "This measurement: ",
                   found["text"] + so_far], className="verdict")  # fmt: skip


@callback(
    Output("exp-pick", "options"),
    Output("exp-pick", "value"),
    Output("exp-head", "children", allow_duplicate=True),
    Input({"type": "exp-run", "key": ALL}, "n_clicks"),
    Input("tabs", "value"),
    Input("url", "search"),
    State("token", "value"),
    prevent_initial_call="initial_duplicate",
    trigger=True,
)
def start(
    svc: Service,
    fired: Any,
    clicks: list[int],
    tab_name: str,
    search: str | None,
    token: str | None,
) -> tuple[Any, Any, Any]:
    """Starts an experiment on a click (``fired``: its button's id); opens the result a link
    names (``?tab=experiments&sweep=ID``: each result has an address of its own); lists the
    experiments run so far (then, or on opening the tab)."""
    picked: Any = no_update
    head: Any = no_update
    linked = query_of(search).get("sweep") if fired in (None, "url") else None
    if isinstance(fired, dict) and any(clicks):
        try:
            svc.runs.authorize(token)
            picked = svc.sweeps.start_experiment(fired["key"])["id"]
        except Unauthorized:
            head = failed(NEEDS_TOKEN, "not started")
        except DomainError as exc:
            head = failed(exc.message, "not started")
    elif linked:
        picked = linked
    elif tab_name != "experiments":
        return no_update, no_update, no_update
    options = [
        {"label": f"{s['name']} · {s['id']}", "value": s["id"]}
        for s in svc.sweeps.experiment_sweeps()
    ]
    return options, picked, head


@callback(
    Output("exp-head", "children"),
    Output("exp-figures", "children"),
    Output("exp-refresh", "disabled"),
    Input("exp-pick", "value"),
    Input("exp-refresh", "n_intervals"),
)
def show(svc: Service, sweep_id: str | None, _n: int | None) -> tuple[Any, Any, bool]:
    """The sweep's result: how far it got, the paper's claim, the verdict, the panels; the
    refresh stops once every run has finished."""
    if not sweep_id:
        return "Run an experiment below, or pick one you ran.", [], True
    try:
        res = svc.sweeps.result(sweep_id)
    except DomainError as exc:
        return failed(exc.message), [], True
    done = res["runs_finished"] == res["runs_total"]
    statuses = [r["status"] for r in svc.sweeps.get(sweep_id)["runs"]]
    queued, running = statuses.count("queued"), statuses.count("running")
    state = "finished" if done else "running" if running else "queued"
    head = [
        html.Span(state, className=f"status status-{'completed' if done else state}"),
        html.B(res["title"]),
        f"  ·  {queued} queued · {running} running · "
        f"{res['runs_finished']} of {res['runs_total']} runs finished",
        html.P(["Paper: ", res["claim"]], className="claim"),
        verdict(res["verdict"], done),
        html.P(res["note"], className="note") if res["note"] else None,
    ]  # fmt: skip
    graphs = [
        dcc.Graph(figure=experiment_figure(p), className="graph",
                  config={"displaylogo": False, "responsive": True})
        for p in res["panels"]
    ]  # fmt: skip
    doctor = arm_diagnoses(res.get("diagnoses") or [], res.get("provoked") or [])
    return head, [*graphs, doctor], done


def arm_diagnoses(arms: list[dict[str, Any]], provoked: list[dict[str, Any]]) -> html.Div:
    """Under the figures: whether the BN doctor found the pitfalls the experiment provokes on
    purpose (in their arm, and not in the control), and what it found in each run of the
    sweep (its rules, by severity; the run's view has the rest)."""
    checks = [html.Li(_provoked(p)) for p in provoked]
    items = []
    for arm in arms:
        found: list[Any] = [
            html.Span([html.Span(d["severity"], className=f"tag tag-{d['severity']}"), " ",
                       html.Code(d["rule"]), " "])
            for d in arm["diagnoses"]
        ] or [html.Span("no BN problem found", className="note")]  # fmt: skip
        link = dcc.Link(arm["name"] or arm["run_id"], href=f"?tab=run&run={arm['run_id']}")
        items.append(html.Li([link, ": ", *found]))
    provoked_part: list[Any] = (
        [html.B("BN doctor on the pitfalls this experiment provokes"), html.Ul(checks)]
        if checks else []
    )  # fmt: skip
    return html.Div(
        [*provoked_part, html.B("BN doctor, per run"), html.Ul(items)],
        className="arm-doctor",
        id="exp-doctor",
    )


def _provoked(p: dict[str, Any]) -> list[Any]:
    """One provoked pitfall: found where provoked? clear in the control?"""

    def said(value: bool | None, yes: str, no: str) -> Any:
        if value is None:
            return html.Span("runs still to finish", className="note")
        return html.Span(yes if value else no, className=f"tag tag-{'info' if value else 'error'}")

    return [
        html.Code(p["rule"]),
        f" at {p['where']}: ",
        said(p["found"], "found", "missed"),
        f"; control {p['control']}: ",
        said(p["control_clear"], "clear", "also found"),
    ]

"""The run view's Diagnosis panel: what the BN doctor (bncore.diagnose, run by the server on every
batch ingested) found in the run, worst first, each with its severity, message, layers (links to
the layer view, the step it fired marked), fix, references and a silence toggle; or "no BN problem
found", and what the run was checked for. Redrawn when the run is opened, when its stream says
a diagnosis was made or changed (assets/live.js: ``live-diagnosis``), when its status changes,
and after a silence."""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlencode

from dash import ALL, Input, Output, State, dcc, html, no_update

from dashboard.views.address import query_of, view_of
from dashboard.views.common import NEEDS_TOKEN, failed
from dashboard.wiring import callback
from server.errors import DomainError, NotFound, Unauthorized
from server.service import Service

#: A reference to an issue or pull request of a GitHub repository ("pytorch/pytorch#88474").
GITHUB_REF = re.compile(r"([\w.-]+/[\w.-]+)#(\d+)")
#: The silence toggle of a diagnosis: which rule, and what a click makes it.
SILENCE = {"type": "doctor-silence", "rule": ALL, "to": ALL}


def panel(report: dict[str, Any], run_id: str) -> list[Any]:
    """The panel's content from the service's report (``{"diagnoses", "checked", "steps"}``)."""
    found, steps = report["diagnoses"], report["steps"]
    head: list[Any] = [html.B("BN doctor"), " · "]
    live = [d for d in found if not d["silenced"] and d["last_step"] is None]
    if not found:
        said = f"no BN problem found in {steps} steps" if steps else "no records diagnosed yet"
        head.append(html.Span(said, className="doctor-ok"))
    else:
        counts = [f"{n} {sev}{'s' * (n > 1)}" for sev in ("error", "warning", "info")
                  if (n := sum(d["severity"] == sev for d in live))]  # fmt: skip
        others = [f"{n} {what}" for what, n in (
            ("resolved", sum(d["last_step"] is not None and not d["silenced"] for d in found)),
            ("silenced", sum(d["silenced"] for d in found))) if n]  # fmt: skip
        head.append(", ".join(counts or ["no active BN problem"]) + f" in {steps} steps")
        if others:
            head.append(html.Span(f" ({', '.join(others)})", className="note"))
    return [
        html.Div(head, className="doctor-head"),
        *[finding(d, run_id) for d in found],
        checked(report["checked"], open_=not found),
        html.Span(id="doctor-note", className="note action-note"),
    ]


def finding(d: dict[str, Any], run_id: str) -> html.Div:
    """One diagnosis: its tag, rule and when; its message; its layers, linked; its fix; its
    references; the silence toggle."""
    when = (
        f"steps {d['first_step']} to {d['last_step']} (resolved)"
        if d["last_step"] is not None
        else f"since step {d['first_step']}"
    )
    to = "off" if d["silenced"] else "on"
    toggle = html.Button(
        "Unsilence" if d["silenced"] else "Silence",
        id={"type": "doctor-silence", "rule": d["rule"], "to": to},
        n_clicks=0,
        className="doctor-silence",
        title="known and intended: left out of badges and warnings"
        if to == "on"
        else "count it again",
    )
    layers: list[Any] = ["the whole run"]
    if d["layers"]:
        layers = []
        for name in d["layers"]:
            layers += [dcc.Link(name, href=layer_link(run_id, name, d)), " "]
    cls = f"finding sev-{d['severity']}" + (" silenced" if d["silenced"] else "")
    return html.Div(
        [
            html.Div(
                [
                    html.Span(d["severity"], className=f"tag tag-{d['severity']}"),
                    html.Code(d["rule"], className="rule"),
                    html.Span(when, className="note"),
                    html.Span("silenced", className="tag tag-silenced") if d["silenced"] else "",
                    toggle,
                ],
                className="finding-head",
            ),
            html.P(d["message"], className="finding-message"),
            html.Div([html.Span("layers: ", className="note"), *layers], className="layers"),
            html.Div("fix:", className="note"),
            html.Pre(html.Code(d["fix"]), className="fix"),
            html.Div(
                [html.Span("references: ", className="note"), *references(d["references"])],
                className="refs",
            ),
        ],
        className=cls,
        id={"type": "doctor-finding", "rule": d["rule"]},
    )


def layer_link(run_id: str, layer: str, d: dict[str, Any]) -> str:
    """The layer view of ``layer``, the step the diagnosis fired at marked on its figures."""
    query = {"tab": "run", "run": run_id, "section": "layer", "layer": layer,
             "step": str(d["first_step"]), "mark": d["rule"]}  # fmt: skip
    return "?" + urlencode(query)


def references(refs: list[str]) -> list[Any]:
    """Each reference, an issue of a GitHub repository as its link."""
    out: list[Any] = []
    for i, ref in enumerate(refs):
        m = GITHUB_REF.fullmatch(ref)
        if m:
            url = f"https://github.com/{m[1]}/issues/{m[2]}"
            out.append(html.A(ref, href=url, target="_blank", rel="noopener"))
        elif ref.startswith(("http://", "https://")):
            out.append(html.A(ref, href=ref, target="_blank", rel="noopener"))
        else:
            out.append(html.Span(ref))
        if i < len(refs) - 1:
            out.append("; ")
    return out


def checked(rules: list[dict[str, Any]], open_: bool) -> html.Div:
    """What the run was checked for (shown when nothing fired); what could not be checked and
    why, folded."""
    done = [r for r in rules if r["checked"]]
    not_done = [r for r in rules if not r["checked"]]
    checked_list = html.Ul([html.Li([html.Code(r["rule"]), ": ", r["checks"]]) for r in done])
    parts: list[Any] = []
    if done:
        parts.append(
            html.Details(
                [html.Summary(f"checked for {len(done)} pitfalls"), checked_list], open=open_
            )
        )
    if not_done:
        parts.append(
            html.Details(
                [
                    html.Summary(f"could not check {len(not_done)}"),
                    html.Ul(
                        [
                            html.Li([html.Code(r["rule"]), f" ({r['checks']}): ", r["reason"]])
                            for r in not_done
                        ]
                    ),
                ]
            )
        )
    return html.Div(parts, className="doctor-checked")


@callback(
    Output("doctor-panel", "children"),
    Input("view-run", "data"),
    Input("live-status", "data"),
    Input("live-diagnosis", "data"),
    Input("doctor-changed", "data"),
    prevent_initial_call=True,  # a link's run comes with its panel (dashboard.app.layout)
)
def show_doctor(svc: Service, run_id: str | None, *_: Any) -> Any:
    """The panel of the run in view, as the service reports it now."""
    if not run_id:
        return []
    try:
        report = svc.diagnoses.report(svc.runs.get(run_id))
    except NotFound:
        return []  # the banner says so
    return panel(report, run_id)


@callback(
    Output("doctor-changed", "data"),
    Output("doctor-note", "children"),
    Input(SILENCE, "n_clicks"),
    State(SILENCE, "id"),
    State("view-run", "data"),
    State("token", "value"),
    prevent_initial_call=True,
    trigger=True,
)
def toggle_silence(
    svc: Service,
    fired: Any,
    clicks: list[int | None],
    ids: list[dict[str, str]],
    run_id: str | None,
    token: str | None,
) -> tuple[Any, Any]:
    """A silence toggle was clicked (``fired``: its id): the rule is silenced for the run, or
    not; the panel is drawn again."""
    pressed = {tuple(sorted(i.items())): n for i, n in zip(ids, clicks, strict=True)}
    if not isinstance(fired, dict) or not pressed.get(tuple(sorted(fired.items()))) or not run_id:
        return no_update, no_update  # a toggle drawn, not clicked
    try:
        svc.runs.authorize(token)
        svc.diagnoses.silence(svc.runs.get(run_id), fired["rule"], fired["to"] == "on")
    except Unauthorized:
        return no_update, failed(NEEDS_TOKEN, "not changed")
    except DomainError as exc:
        return no_update, failed(exc.message, "not changed")
    return time.time(), no_update


@callback(
    Output("want-step", "data"),
    Output("layer-select", "value", allow_duplicate=True),
    Input("url", "search"),
    prevent_initial_call=True,
    service=False,
)
def step_from_link(search: str | None) -> tuple[Any, Any]:
    """A link that names a step (a diagnosis's layer link): that step is marked on the run's
    figures, and the layer it names is shown (even where the layer view was open on another)."""
    view = view_of(query_of(search))
    if view.step is None or not view.run:
        return no_update, no_update
    marked = {"run": view.run, "layer": view.layer, "step": view.step, "mark": view.mark}
    return marked, view.layer or no_update

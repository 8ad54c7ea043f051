"""A run's report: one self-contained HTML page (plotly.js and every figure inside it, no link
out) with the run's status, what the BN doctor found, summary and config, to attach to a paper
or a pull request.

Served at ``GET /api/runs/{id}/report`` (registered on the API's app when the dashboard is
mounted) and linked from the run view.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

import plotly.io as pio
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from dashboard import data, plotlyjs
from dashboard.figures.run import about, run_figures
from server.schemas import ERROR_RESPONSES
from server.service import Service

#: The figures of the report, in order, with the heading each sits under.
REPORT_SECTIONS = {
    "Training": ("fig-loss", "fig-acc"),
    "Batch statistics through depth and time": ("fig-heat-var", "fig-heat-mean", "fig-channels"),
    "Gradients": ("fig-depth", "fig-heat-grad", "fig-heat-sat"),
    "One layer": ("fig-layer", "fig-affine", "fig-grads", "fig-pct"),
}
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1100px; color: #1f2937; padding: 0 12px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #e2e8f0; padding: 3px 8px; text-align: left; vertical-align: top; }
pre { background: #f8fafc; padding: 8px; font-size: 12px; white-space: pre-wrap; }
.status { font-weight: 600; padding: 2px 8px; border-radius: 10px; background: #e0e7ff; }
.figure { border: 1px solid #e2e8f0; border-radius: 4px; margin: 8px 0; }
.finding { border-left: 4px solid #94a3b8; padding: 2px 10px; margin: 10px 0; }
.finding.error { border-color: #b91c1c; } .finding.warning { border-color: #d97706; }
.finding.info { border-color: #2563eb; }
.tag { font-weight: 600; font-size: 12px; padding: 1px 8px; border-radius: 10px; }
.tag.error { background: #fee2e2; color: #991b1b; }
.tag.warning { background: #fef3c7; color: #92400e; }
.tag.info { background: #dbeafe; color: #1e40af; }
.note { color: #64748b; font-size: 13px; }
"""


def render(svc: Service, run_id: str) -> str:
    """The report page of one run (NotFound if there is none)."""
    run = svc.runs.get(run_id)
    view = data.run_view(svc, run_id, None)
    figs, _ = run_figures(view)
    out = svc.runs.out(run)
    facts = {
        "id": run["id"],
        "status": run["status"],
        "steps": f"{run['steps_done']}"
        + (f" of {out['steps_total']}" if out["steps_total"] else ""),
        "created": when(run["created_at"]),
        "started": when(run.get("started_at")),
        "finished": when(run.get("finished_at")),
        "layers": ", ".join(view["layers"]),
        "layer shown in 'One layer'": view["layer"] or "",
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>BN Scope report: {html.escape(run.get('name') or run['id'])}</title>",
        f"<style>{STYLE}</style>",
        f"<script>{plotlyjs.source()}</script>",  # inline: the page opens offline
        "</head><body>",
        f"<h1>{html.escape(run.get('name') or run['id'])} "
        f"<span class='status'>{html.escape(run['status'])}</span></h1>",
        _table(facts),
    ]
    if run.get("message"):
        parts.append(f"<pre>{html.escape(run['message'])}</pre>")
    parts += diagnosis_section(svc.diagnoses.report(run))
    if run.get("final"):
        parts += ["<h2>Summary (final evaluation)</h2>", _table(run["final"])]
    for heading, ids in REPORT_SECTIONS.items():
        shown = [figs[g] for g in ids if g in figs]
        if not shown:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for graph in (g for g in ids if g in figs):
            body = pio.to_html(
                figs[graph], include_plotlyjs=False, full_html=False, config={"displaylogo": False}
            )
            look = html.escape(f"Look for {about(graph).look_for}.")
            parts.append(f"<div class='figure'>{body}<p class='note'>{look}</p></div>")
    config = run.get("config") or run.get("meta") or {}
    parts += [
        "<h2>Config</h2>",
        f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>",
        f"<p style='font-size:12px;color:#64748b'>BN Scope, {when(time.time())}</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def diagnosis_section(report: dict[str, Any]) -> list[str]:
    """What the BN doctor found (docs/diagnoses.md): each diagnosis with its severity, rule,
    layers, steps, message, fix and references; or that it found nothing, and what it checked."""
    esc = html.escape
    found, steps = report["diagnoses"], report["steps"]
    parts = ["<h2>Diagnosis (BN doctor)</h2>"]
    if not found:
        parts.append(f"<p>No BN problem found in {steps} steps.</p>")
    for d in found:
        when = (
            f"steps {d['first_step']} to {d['last_step']} (resolved)"
            if d["last_step"] is not None
            else f"since step {d['first_step']}"
        )
        silenced = " <span class='note'>(silenced: known and intended)</span>" * d["silenced"]
        layers = ", ".join(d["layers"]) or "the whole run"
        parts.append(
            f"<div class='finding {esc(d['severity'])}'><p><span class='tag "
            f"{esc(d['severity'])}'>{esc(d['severity'])}</span> <b>{esc(d['rule'])}</b> "
            f"<span class='note'>{esc(when)}, in {esc(layers)}</span>{silenced}</p>"
            f"<p>{esc(d['message'])}</p><p class='note'>fix:</p><pre>{esc(d['fix'])}</pre>"
            f"<p class='note'>references: {esc('; '.join(d['references']))}</p></div>"
        )
    done = [c for c in report["checked"] if c["checked"]]
    not_done = [c for c in report["checked"] if not c["checked"]]
    items = "".join(f"<li>{esc(c['rule'])}: {esc(c['checks'])}</li>" for c in done)
    parts.append(f"<details><summary>checked for {len(done)} pitfalls</summary><ul>{items}</ul>"
                 "</details>")  # fmt: skip
    if not_done:
        items = "".join(
            f"<li>{esc(c['rule'])} ({esc(c['checks'])}): {esc(c['reason'] or '')}</li>"
            for c in not_done
        )
        parts.append(
            f"<details><summary>could not check {len(not_done)}</summary><ul>{items}</ul></details>"
        )
    return parts


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def register(app: FastAPI, svc: Service) -> None:
    """``GET /api/runs/{id}/report`` on the API's app."""

    def report(run_id: str) -> HTMLResponse:
        """The run as one self-contained HTML page: status, summary, figures, config."""
        page = render(svc, run_id)  # NotFound (a 404) when there is no such run
        name = f"bnscope-{run_id}.html"
        headers = {"content-disposition": f'inline; filename="{name}"'}
        return HTMLResponse(page, headers=headers)

    app.add_api_route(
        "/api/runs/{run_id}/report",
        report,
        methods=["GET"],
        response_class=HTMLResponse,
        responses={  # its refusals are JSON (ErrorOut), as every other operation's
            "4XX": {
                "description": ERROR_RESPONSES["4XX"]["description"],
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}
                },
            }
        },
        tags=["runs"],
        summary="A self-contained HTML report of the run",
    )

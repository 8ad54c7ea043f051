"""The dashboard's behaviour. Server callbacks read the store (dashboard.data) and draw
(dashboard.figures); the live path runs in the browser (assets/live.js). A failing callback
shows its error in the page and leaves the figures as they were: the page never goes blank."""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from dash import ALL, ClientsideFunction, Dash, Input, Output, State, ctx, html, no_update

from bncore.config import ConfigError, parse_config
from dashboard import data, figures
from dashboard.form import PRESETS, build_form, collect
from server.errors import DomainError, Unauthorized
from server.schemas import SweepCreate
from server.service import Service

log = logging.getLogger(__name__)


def banner(run: dict[str, Any] | None, error: str | None = None) -> list[Any]:
    if error:
        return [html.Span("error", className="status status-failed"), error]
    if run is None:
        return ["Pick a run in the Runs tab (or launch one)."]
    total = run.get("steps_total")
    parts: list[Any] = [
        html.Span(run["status"], className=f"status status-{run['status']}", id="run-status"),
        html.B(run.get("name") or run["id"]),
        f"  ·  id {run['id']}  ·  step ",
        html.Span(str(run["steps_done"]), id="run-step"),
        f" of {total}" if total else "",
    ]
    final = run.get("final") or {}
    if "test_acc" in final:
        parts.append(f"  ·  test accuracy {final['test_acc']:.4f}")
    if run.get("message"):
        parts.append(html.Pre(run["message"], id="run-message"))
    return parts


def register(app: Dash, svc: Service, sections: dict[str, tuple[str, ...]]) -> None:
    graphs = [g for section in sections.values() for g in section]

    @app.callback(
        Output("runs-table", "data"),
        Input("runs-refresh", "n_intervals"),
        Input("launch-result", "children"),
    )
    def refresh(_n: int | None, _launched: Any) -> Any:
        try:
            return data.runs(svc)
        except Exception:  # the store is busy or gone: keep the table as it is
            log.exception("runs table")
            return no_update

    @app.callback(
        Output("view-run", "data"),
        Output("compare-runs", "data"),
        Output("tabs", "value"),
        Output("runs-note", "children"),
        Input("open-run", "n_clicks"),
        Input("open-compare", "n_clicks"),
        Input("url", "search"),
        State("runs-table", "data"),
        State("runs-table", "selected_rows"),
    )
    def open_runs(
        _a: int, _b: int, search: str | None, rows: list[dict], selected: list[int]
    ) -> Any:
        if ctx.triggered_id in (None, "url"):  # a link: /dashboard/?run=ID or ?compare=A,B
            query = parse_qs((search or "").lstrip("?"))
            if query.get("run"):
                return query["run"][0], no_update, "run", ""
            if query.get("compare"):
                return no_update, query["compare"][0].split(","), "compare", ""
            return no_update, no_update, no_update, ""
        ids = [rows[i]["id"] for i in selected or [] if i < len(rows)]
        if not ids:
            return no_update, no_update, no_update, "select a run first (tick its box)"
        if ctx.triggered_id == "open-run":
            return ids[0], no_update, "run", ""
        if len(ids) < 2:
            return no_update, no_update, no_update, "select two or more runs to compare"
        return no_update, ids, "compare", ""

    @app.callback(
        *[Output(g, "figure") for g in graphs],
        Output("live-spec", "data"),
        Output("layer-select", "options"),
        Output("layer-select", "value"),
        Output("run-banner", "children"),
        Input("view-run", "data"),
        Input("layer-select", "value"),
        Input("live-reset", "data"),
        Input("section", "value"),
    )
    def render_run(run_id: str | None, layer: str | None, _reset: Any, section: str) -> Any:
        """The open section's figures, fresh from the store, and what feeds them live."""
        keep = [no_update] * len(graphs)
        if not run_id:
            return *keep, no_update, [], None, banner(None)
        try:
            view = data.run_view(svc, run_id, layer)
            figs, specs = figures.run_figures(view)
        except KeyError:
            return *keep, None, [], None, banner(None, f"run {run_id} no longer exists")
        except Exception as exc:
            log.exception("run view")
            return *keep, no_update, no_update, no_update, banner(None, f"{exc}")
        shown = set(sections.get(section, ()))
        out = [figs.get(g, no_update) if g in shown else no_update for g in graphs]
        spec = {
            "run": run_id,
            "specs": [s for s in specs if s["graph"] in shown],
            "layers": view["layers"],
        }
        return (*out, spec, view["layers"], view["layer"], banner(svc.runs.out(view["run"])))

    @app.callback(
        Output("run-banner", "children", allow_duplicate=True),
        Output("live-reset", "data", allow_duplicate=True),
        Input("live-status", "data"),
        State("live-spec", "data"),
        prevent_initial_call=True,
    )
    def live_status(run: dict[str, Any] | None, spec: dict[str, Any] | None) -> Any:
        if not run:
            return no_update, no_update
        # the worker has just said which layers it has: draw them
        layers_known = bool((run.get("meta") or {}).get("layers"))
        redraw = layers_known and spec is not None and not spec.get("layers")
        return banner(run), (time.time() if redraw else no_update)

    app.clientside_callback(
        ClientsideFunction("bnscope", "watch"),
        Output("watching", "data"),
        Input("view-run", "data"),
    )
    app.clientside_callback(
        ClientsideFunction("bnscope", "follow"),
        Output("following", "data"),
        Input("live-spec", "data"),
    )

    @app.callback(
        Output("cmp-loss", "figure"),
        Output("cmp-acc", "figure"),
        Output("cmp-stat-fig", "figure"),
        Output("cmp-layer", "options"),
        Output("cmp-layer", "value"),
        Input("compare-runs", "data"),
        Input("cmp-stat", "value"),
        Input("cmp-layer", "value"),
    )
    def compare(run_ids: list[str] | None, stat: str, layer: str | None) -> Any:
        if not run_ids:
            return (no_update,) * 5
        try:
            runs = data.compare_view(svc, run_ids, stat, layer)
            figs = figures.compare_figures(runs, stat)
        except Exception:
            log.exception("compare view")
            return (no_update,) * 5
        layers = list(dict.fromkeys(name for r in runs for name in r["layers"]))
        chosen = layer if layer in layers else (runs[0]["layer"] if runs else None)
        return figs["cmp-loss"], figs["cmp-acc"], figs["cmp-stat-fig"], layers, chosen

    @app.callback(
        Output("form-box", "children"),
        Output("grid", "value"),
        Input("preset", "value"),
        prevent_initial_call=True,
    )
    def preset(name: str | None) -> Any:
        if not name:
            return build_form(), ""
        p = PRESETS[name]
        return build_form(parse_config(p["base"])), json.dumps(p["grid"])

    @app.callback(
        Output("launch-result", "children"),
        Output({"type": "cfg-err", "field": ALL}, "children"),
        Input("launch", "n_clicks"),
        State({"type": "cfg", "field": ALL}, "value"),
        State({"type": "cfg", "field": ALL}, "id"),
        State("grid", "value"),
        State("token", "value"),
        prevent_initial_call=True,
    )
    def launch(
        _n: int, values: list[Any], ids: list[dict[str, str]], grid: str, token: str | None
    ) -> Any:
        fields = [i["field"] for i in ids]
        errors = {f: "" for f in fields}

        def fail(message: str) -> Any:
            return [html.Span("not launched", className="status status-failed"), message], [
                errors[f] for f in fields
            ]

        try:
            svc.runs.authorize(token)
        except Unauthorized:
            return fail("this server needs its token to launch runs")
        body = collect(ids, values)
        try:
            config = parse_config(body)
        except ConfigError as exc:
            for field, message in exc.errors:
                errors[field if field in errors else fields[0]] = message
            return fail("fix the fields marked in red")
        try:
            if grid and grid.strip():
                sweep = svc.sweeps.create(SweepCreate(base=body, grid=json.loads(grid), name=None))
                msg = f"sweep {sweep['id']}: {len(sweep['runs'])} runs queued"
            else:
                run = svc.runs.create(config)
                msg = f"run {run['id']} queued"
        except json.JSONDecodeError as exc:
            return fail(f"the sweep grid is not JSON: {exc}")
        except DomainError as exc:
            if isinstance(exc.detail, dict):
                for e in exc.detail.get("errors", []):
                    if e["field"] in errors:
                        errors[e["field"]] = e["message"]
                return fail(f"grid point {exc.detail.get('point')}: fix the fields marked in red")
            return fail(exc.message)
        except Exception as exc:
            return fail(f"{type(exc).__name__}: {exc}")
        return [html.Span("launched", className="status status-running"), msg], [
            errors[f] for f in fields
        ]

"""The dashboard's behaviour. Server callbacks read the store (dashboard.data) and draw
(dashboard.figures); the live path runs in the browser (assets/live.js). A failing callback
shows its error in the page and leaves the figures as they were: the page never goes blank.

The address bar follows the view (``?tab=run&run=ID&section=layer&layer=NAME``,
``?tab=compare&compare=A,B``), so any view can be shared by its link.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode

from dash import ALL, ClientsideFunction, Dash, Input, Output, State, ctx, dcc, html, no_update

from bncore.run.config import ConfigError, parse_config
from bncore.status import FINISHED
from dashboard import data
from dashboard.figures.compare import compare_figures
from dashboard.figures.factory import nothing
from dashboard.figures.run import run_figures
from dashboard.form import PRESETS, blanks, build_form, collect
from server.errors import (
    DomainError,
    InvalidGridPoint,
    NotFound,
    Unauthorized,
    UnknownSweepField,
)
from server.schemas import SweepCreate
from server.service import Service

log = logging.getLogger(__name__)
#: The top-level tabs: the ``tab`` of a shared link.
TABS = ("runs", "run", "compare", "launch", "experiments", "calculator")
NEEDS_TOKEN = "this server needs its token: type it in the Launch tab"


def failed(text: str, label: str = "error") -> list[Any]:
    return [html.Span(label, className="status status-failed"), text]


def banner(run: dict[str, Any] | None, error: str | None = None) -> list[Any]:
    if error:
        return failed(error)
    if run is None:
        return ["Pick a run in the Runs tab (tick it, then Open), or launch one."]
    total = run.get("steps_total")
    parts: list[Any] = [
        html.Span(run["status"], className=f"status status-{run['status']}", id="run-status"),
        html.B(run.get("name") or run["id"]),
        f"  ·  id {run['id']}  ·  step ",
        html.Span(str(run["steps_done"]), id="run-step"),
        f" of {total}" if total else "",
    ]
    if run.get("queue_position") is not None:
        parts.append(f"  ·  waiting: #{run['queue_position'] + 1} in the queue")
    final = run.get("final") or {}
    if "test_acc" in final:
        parts.append(f"  ·  test accuracy {final['test_acc']:.4f}")
    if run.get("message"):
        parts.append(html.Pre(run["message"], id="run-message"))
    return parts


class View(NamedTuple):
    """What a link asks to see (None: not said)."""

    run: str | None
    compare: list[str] | None
    tab: str | None
    section: str | None
    layer: str | None


def view_of(query: dict[str, str], sections: tuple[str, ...]) -> View:
    """The view a link's parameters name (``?run=ID`` alone means its run view)."""
    run = query.get("run") or None
    compare = [i for i in query.get("compare", "").split(",") if i] or None
    tab = query.get("tab") or ("run" if run else "compare" if compare else None)
    section = query.get("section")
    return View(
        run,
        compare,
        tab if tab in TABS else None,
        section if section in sections else None,
        query.get("layer") or None,
    )


def chosen(rows: list[dict] | None, selected: list[int] | None) -> list[str]:
    """The ids of the ticked rows of the runs table."""
    return [rows[i]["id"] for i in selected or [] if rows and i < len(rows)]


def run_link(run_id: str) -> dcc.Link:
    return dcc.Link(f"run {run_id}", href=f"/dashboard/?tab=run&run={run_id}")


def register(app: Dash, svc: Service, sections: dict[str, tuple[str, ...]]) -> None:
    graphs = [g for section in sections.values() for g in section]

    @app.callback(
        Output("runs-table", "data"),
        Input("runs-refresh", "n_intervals"),
        Input("launch-result", "children"),
        Input("runs-changed", "data"),
        Input("server-back", "data"),
    )
    def refresh(*_: Any) -> Any:
        try:
            return data.runs(svc)
        except Exception:  # the store is busy or gone: keep the table as it is
            log.exception("runs table")
            return no_update

    # -- which view: buttons and the address bar ----------------------------------------------

    @app.callback(
        Output("view-run", "data"),
        Output("compare-runs", "data"),
        Output("tabs", "value"),
        Output("section", "value"),
        Output("want-layer", "data"),
        Output("runs-note", "children"),
        Input("open-run", "n_clicks"),
        Input("open-compare", "n_clicks"),
        Input("url", "search"),
        State("runs-table", "data"),
        State("runs-table", "selected_rows"),
        State("view-run", "data"),
        State("compare-runs", "data"),
        State("tabs", "value"),
        State("section", "value"),
    )
    def open_runs(
        _a: int,
        _b: int,
        search: str | None,
        rows: list[dict],
        selected: list[int],
        run_now: str | None,
        compare_now: list[str] | None,
        tab_now: str,
        section_now: str,
    ) -> Any:
        keep = no_update
        if ctx.triggered_id in (None, "url"):  # a link, or the address bar following the view
            query = {k: v[0] for k, v in parse_qs((search or "").lstrip("?")).items()}
            view = view_of(query, tuple(sections))
            return (
                view.run if view.run and view.run != run_now else keep,
                view.compare if view.compare and view.compare != compare_now else keep,
                view.tab if view.tab and view.tab != tab_now else keep,
                view.section if view.section and view.section != section_now else keep,
                view.layer or keep,
                "",
            )
        ids = chosen(rows, selected)
        if not ids:
            return keep, keep, keep, keep, keep, "select a run first (tick its box)"
        if ctx.triggered_id == "open-run":
            return ids[0], keep, "run", keep, keep, ""
        if len(ids) < 2:
            return keep, keep, keep, keep, keep, "select two or more runs to compare"
        return keep, ids, "compare", keep, keep, ""

    @app.callback(
        Output("url", "search"),
        Input("view-run", "data"),
        Input("compare-runs", "data"),
        Input("tabs", "value"),
        Input("section", "value"),
        Input("layer-select", "value"),
        State("url", "search"),
        prevent_initial_call=True,
    )
    def follow_view(
        run: str | None,
        compare: list[str] | None,
        tab: str,
        section: str,
        layer: str | None,
        search: str | None,
    ) -> Any:
        query: dict[str, str] = {"tab": tab}
        if run and tab == "run":
            query["run"] = run
            query["section"] = section
            if section == "layer" and layer:
                query["layer"] = layer
        if compare and tab == "compare":
            query["compare"] = ",".join(compare)
        wanted = "?" + urlencode(query, safe=",")
        return no_update if wanted == (search or "") else wanted

    # -- one run ------------------------------------------------------------------------------

    @app.callback(
        *[Output(g, "figure") for g in graphs],
        Output("live-spec", "data"),
        Output("layer-select", "options"),
        Output("layer-select", "value"),
        Output("run-banner", "children"),
        Output("run-report", "href"),
        Input("view-run", "data"),
        Input("layer-select", "value"),
        Input("live-reset", "data"),
        Input("section", "value"),
        State("want-layer", "data"),
    )
    def render_run(
        run_id: str | None, layer: str | None, _reset: Any, section: str, wanted: str | None
    ) -> Any:
        """The open section's figures, fresh from the store, and what feeds them live."""
        keep = [no_update] * len(graphs)
        if not run_id:
            return *keep, no_update, [], None, banner(None), ""
        try:
            view = data.run_view(svc, run_id, layer or wanted)
            figs, specs = run_figures(view)
        except NotFound:
            empty = [nothing("no run to show") for _ in graphs]
            message = (
                f"there is no run with id {run_id!r} (deleted, or a mistyped link): pick one "
                "in the Runs tab"
            )
            return *empty, None, [], None, banner(None, message), ""
        except Exception as exc:
            log.exception("run view")
            return *keep, no_update, no_update, no_update, banner(None, f"{exc}"), no_update
        shown = set(sections.get(section, ()))
        out = [figs.get(g, no_update) if g in shown else no_update for g in graphs]
        spec = {
            "run": run_id,
            "specs": [s for s in specs if s["graph"] in shown],
            "layers": view["layers"],
        }
        report = f"/api/runs/{run_id}/report"
        run_banner = banner(svc.runs.out(view["run"]))
        return (*out, spec, view["layers"], view["layer"], run_banner, report)

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
        # the worker has just said which layers it has, or the run ended: draw it from the
        # store (the final per-channel arrays, everything the stream did not carry)
        layers_known = bool((run.get("meta") or {}).get("layers"))
        redraw = (layers_known and spec is not None and not spec.get("layers")) or (
            run["status"] in FINISHED
        )
        return banner(run), (time.time() if redraw else no_update)

    @app.callback(
        Output("live-reset", "data", allow_duplicate=True),
        Input("server-back", "data"),
        State("view-run", "data"),
        prevent_initial_call=True,
    )
    def server_back(_back: Any, run_id: str | None) -> Any:
        """The server is reachable again: redraw what it may have changed meanwhile."""
        return time.time() if run_id else no_update

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

    # -- acting on runs: cancel, delete (after a confirmation) --------------------------------

    @app.callback(
        Output("runs-note", "children", allow_duplicate=True),
        Output("run-note", "children", allow_duplicate=True),
        Output("runs-changed", "data", allow_duplicate=True),
        Input("cancel-runs", "n_clicks"),
        Input("run-cancel", "n_clicks"),
        State("runs-table", "data"),
        State("runs-table", "selected_rows"),
        State("view-run", "data"),
        State("token", "value"),
        prevent_initial_call=True,
    )
    def cancel(
        _a: int, _b: int, rows: list[dict], selected: list[int], run_id: str | None, token: str
    ) -> Any:
        from_list = ctx.triggered_id == "cancel-runs"
        ids = chosen(rows, selected) if from_list else [run_id] if run_id else []
        note = act(ids, svc.runs.cancel, "cancelled", token)
        return (note, no_update, time.time()) if from_list else (no_update, note, time.time())

    @app.callback(
        Output("confirm-delete", "displayed"),
        Output("confirm-delete", "message"),
        Output("delete-ids", "data"),
        Output("runs-note", "children", allow_duplicate=True),
        Input("delete-runs", "n_clicks"),
        Input("run-delete", "n_clicks"),
        State("runs-table", "data"),
        State("runs-table", "selected_rows"),
        State("view-run", "data"),
        prevent_initial_call=True,
    )
    def ask_delete(
        _a: int, _b: int, rows: list[dict], selected: list[int], run_id: str | None
    ) -> Any:
        ids = chosen(rows, selected) if ctx.triggered_id == "delete-runs" else [run_id or ""]
        ids = [i for i in ids if i]
        if not ids:
            return False, no_update, no_update, "select a run first (tick its box)"
        names = ", ".join(ids)
        message = f"Delete {len(ids)} run(s) and all their records? {names}. This cannot be undone."
        return True, message, ids, ""

    @app.callback(
        Output("runs-note", "children", allow_duplicate=True),
        Output("runs-changed", "data", allow_duplicate=True),
        Output("view-run", "data", allow_duplicate=True),
        Output("tabs", "value", allow_duplicate=True),
        Input("confirm-delete", "submit_n_clicks"),
        State("delete-ids", "data"),
        State("view-run", "data"),
        State("token", "value"),
        prevent_initial_call=True,
    )
    def delete(_n: int, ids: list[str] | None, run_id: str | None, token: str) -> Any:
        note = act(ids or [], svc.runs.delete, "deleted", token)
        if run_id in (ids or []):  # the run in view is gone: back to the list
            return note, time.time(), None, "runs"
        return note, time.time(), no_update, no_update

    def act(ids: list[str], action: Any, done: str, token: str | None) -> list[Any]:
        """Do ``action`` to each run; one line on what happened."""
        if not ids:
            return failed("select a run first (tick its box)", "nothing done")
        try:
            svc.runs.authorize(token)
        except Unauthorized:
            return failed(NEEDS_TOKEN, "nothing done")
        ok, refused = [], []
        for run_id in ids:
            try:
                action(run_id)
                ok.append(run_id)
            except DomainError as exc:
                refused.append(exc.message)
        parts: list[Any] = [f"{done}: {', '.join(ok)}"] if ok else []
        if refused:
            parts += [html.Br()] * bool(parts) + failed("; ".join(refused), "refused")
        return parts

    # -- comparing runs -----------------------------------------------------------------------

    @app.callback(
        Output("cmp-loss", "figure"),
        Output("cmp-acc", "figure"),
        Output("cmp-stat-fig", "figure"),
        Output("cmp-layer", "options"),
        Output("cmp-layer", "value"),
        Output("cmp-note", "children"),
        Output("cmp-figures", "style"),
        Input("compare-runs", "data"),
        Input("cmp-stat", "value"),
        Input("cmp-layer", "value"),
    )
    def compare(run_ids: list[str] | None, stat: str, layer: str | None) -> Any:
        hint = "Tick two or more runs in the Runs tab and press Compare."
        if not run_ids:
            return (no_update,) * 5 + (hint, {"display": "none"})
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
        chosen_layer = layer if layer in layers else (runs[0]["layer"] if runs else None)
        return (figs["cmp-loss"], figs["cmp-acc"], figs["cmp-stat-fig"], layers, chosen_layer,
                note, {})  # fmt: skip

    # -- launching ----------------------------------------------------------------------------

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
        Output("grid-err", "children"),
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
        errors: dict[str, list[str]] = {f: [] for f in fields}
        grid_errors: list[str] = []

        def mark(field: str, message: str) -> None:
            """Beside its field; a grid key that is no form field, beside the grid."""
            if field in errors:
                errors[field].append(message)
            else:
                grid_errors.append(f"{field}: {message}" if field else message)

        def answer(banner_parts: list[Any]) -> Any:
            return banner_parts, ["; ".join(errors[f]) for f in fields], "; ".join(grid_errors)

        def fail(message: str) -> Any:
            return answer(failed(message, "not launched"))

        try:
            svc.runs.authorize(token)
        except Unauthorized:
            return fail("this server needs its token to launch runs")
        for field, message in blanks(ids, values).items():
            mark(field, message)
        body = collect(ids, values)
        try:
            config = parse_config(body)
        except ConfigError as exc:
            for field, message in exc.errors:
                mark(field, message)
        if any(errors.values()) or grid_errors:
            return fail("fix the fields marked in red")
        try:
            if grid and grid.strip():
                points = json.loads(grid)
                if not isinstance(points, dict):
                    grid_errors.append('a JSON object of field -> values: {"optim.lr": [0.1]}')
                    return fail("fix the sweep grid")
                sweep = svc.sweeps.create(SweepCreate(base=body, grid=points, name=None))
                msg: list[Any] = [f"sweep {sweep['id']}: {len(sweep['runs'])} runs queued: "]
                for i, r in enumerate(sweep["runs"][:8]):
                    msg += [", "] * bool(i) + [run_link(r["id"])]
            else:
                run = svc.runs.create(config)
                msg = [run_link(run["id"]), " queued: open it to watch it train"]
        except json.JSONDecodeError as exc:
            grid_errors.append(f"not JSON: {exc}")
            return fail("fix the sweep grid")
        except InvalidGridPoint as exc:
            for field, message in exc.field_errors:
                mark(field, message)
            return fail(f"grid point {exc.point}: fix the fields marked in red")
        except UnknownSweepField as exc:
            grid_errors.append(exc.message)
            return fail("fix the sweep grid")
        except DomainError as exc:
            return fail(exc.message)
        except Exception as exc:
            return fail(f"{type(exc).__name__}: {exc}")
        return answer([html.Span("launched", className="status status-running"), *msg])

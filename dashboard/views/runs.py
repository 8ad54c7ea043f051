"""The runs list: every run, refreshed every 2 s, a sweep's (or an experiment's) runs folded
into one row; a click on a run's id or name opens it, on a sweep's unfolds it; tick runs (or
sweeps), then open, compare (see dashboard.views.address), cancel or delete them (delete after
a confirmation). The run view's own Cancel and Delete act here too, on the run in view."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dash import Input, Output, State, dash_table, dcc, html, no_update

from dashboard import data
from dashboard.views.common import NEEDS_TOKEN, SELECT_FIRST, TICKED, chosen, failed
from dashboard.wiring import callback
from server.errors import DomainError, Unauthorized
from server.service import Service

log = logging.getLogger(__name__)
COLUMNS = {"id": "id", "name": "name", "status": "status", "progress": "progress",
           "created": "created", "duration": "duration", "eta": "queue / ETA",
           "model": "model", "norm": "norm", "test_acc": "test acc",
           "doctor": "BN doctor", "message": "message"}  # fmt: skip
STATUS_COLORS = (("diverged", "#b45309"), ("failed", "#b91c1c"), ("interrupted", "#7c3aed"),
                 ("running", "#047857"))  # fmt: skip
#: The BN doctor's badge, coloured by the worst it counts (warnings first: errors win).
DOCTOR_COLORS = (("warning", "#b45309"), ("error", "#b91c1c"))
#: Where an action on runs says what it did, and that the list has changed.
NOTE = Output("runs-note", "children", allow_duplicate=True)
CHANGED = Output("runs-changed", "data", allow_duplicate=True)
#: The columns a click on opens the run (or unfolds the sweep).
OPENS = ("id", "name")
#: What an action on runs reads: the ticked rows of the list, and the run in view.
TARGETS = (*TICKED, State("view-run", "data"))


def layout() -> html.Div:
    """The Runs tab."""
    toolbar = [
        html.Button("Open", id="open-run", n_clicks=0, className="primary"),
        html.Button("Compare", id="open-compare", n_clicks=0),
        html.Button("Cancel", id="cancel-runs", n_clicks=0),
        html.Button("Delete", id="delete-runs", n_clicks=0, className="danger"),
        html.Span("click a run's name to open it; tick runs, then act on them", className="note"),
        html.Span(id="runs-note", className="note action-note"),
    ]
    table = dash_table.DataTable(  # type: ignore[attr-defined]  # generated at import
        id="runs-table",
        columns=[{"name": v, "id": k} for k, v in COLUMNS.items()],
        data=[],
        row_selectable="multi",
        selected_rows=[],
        page_size=25,
        sort_action="native",
        style_table={"overflowX": "auto", "minWidth": "100%"},
        style_cell={"textAlign": "left", "fontSize": 13, "maxWidth": 360,
                    "whiteSpace": "normal", "height": "auto"},
        style_data_conditional=[
            *({"if": {"column_id": c}, "cursor": "pointer", "color": "#1d4ed8"} for c in OPENS),
            *({"if": {"filter_query": f'{{status}} = "{s}"'}, "color": c}
              for s, c in STATUS_COLORS),
            *({"if": {"filter_query": f'{{doctor}} contains "{word}"', "column_id": "doctor"},
               "color": c, "fontWeight": 600} for word, c in DOCTOR_COLORS),
        ],
    )  # fmt: skip
    return html.Div(
        [
            html.Div(toolbar, className="toolbar"),
            table,
            dcc.Interval(id="runs-refresh", interval=2000),
            dcc.Store(id="runs-unfolded", data=[]),  # the sweeps shown with their runs
        ]
    )


@callback(
    Output("runs-table", "data"),
    Input("runs-refresh", "n_intervals"),
    Input("launch-result", "children"),
    Input("runs-changed", "data"),
    Input("server-back", "data"),
    Input("runs-unfolded", "data"),
)
def refresh(svc: Service, *inputs: Any) -> Any:
    """The table's rows (dashboard.data.runs), newest first, the unfolded sweeps' runs shown."""
    try:
        return data.runs(svc, unfolded=inputs[-1] or ())
    except Exception:  # the store is busy or gone: keep the table as it is
        log.exception("runs table")
        return no_update


@callback(
    Output("view-run", "data", allow_duplicate=True),
    Output("tabs", "value", allow_duplicate=True),
    Output("runs-unfolded", "data"),
    Output("runs-table", "active_cell"),
    Output("runs-table", "selected_cells"),
    Input("runs-table", "active_cell"),
    State("runs-table", "data"),
    State("runs-unfolded", "data"),
    prevent_initial_call=True,
    service=False,
)
def clicked(
    cell: dict[str, Any] | None, rows: list[dict] | None, unfolded: list[str] | None
) -> tuple[Any, ...]:
    """A click on a run's id or name opens it; on a sweep's, shows or hides its runs. The
    cell is let go at once, so that the next click on it counts too."""
    keep = no_update
    if not cell or cell.get("column_id") not in OPENS:
        return keep, keep, keep, keep, keep
    row = next((r for r in rows or [] if r["id"] == cell.get("row_id")), None)
    if row is None:
        return keep, keep, keep, None, []
    if row.get("runs"):  # a sweep's row
        return keep, keep, sorted(set(unfolded or []) ^ {row["id"]}), None, []
    return row["id"], "run", keep, None, []


def targets(
    from_list: bool, rows: list[dict] | None, selected: list[int] | None, run_id: str | None
) -> list[str]:
    """The runs an action is for: the ticked ones (``from_list``), or the run in view."""
    return chosen(rows, selected) if from_list else [run_id] if run_id else []


@callback(
    NOTE,
    Output("run-note", "children", allow_duplicate=True),
    CHANGED,
    Input("cancel-runs", "n_clicks"),
    Input("run-cancel", "n_clicks"),
    *TARGETS,
    State("token", "value"),
    prevent_initial_call=True,
    trigger=True,
)
def cancel(
    svc: Service,
    fired: Any,
    _a: int,
    _b: int,
    rows: list[dict],
    selected: list[int],
    run_id: str | None,
    token: str | None,
) -> tuple[Any, Any, float]:
    """Cancel the ticked runs (the list's Cancel) or the run in view (the run's); the note
    goes beside the button pressed."""
    from_list = fired == "cancel-runs"
    note = act(svc, targets(from_list, rows, selected, run_id), svc.runs.cancel, "cancelled", token)
    return (note, no_update, time.time()) if from_list else (no_update, note, time.time())


@callback(
    Output("confirm-delete", "displayed"),
    Output("confirm-delete", "message"),
    Output("delete-ids", "data"),
    NOTE,
    Input("delete-runs", "n_clicks"),
    Input("run-delete", "n_clicks"),
    *TARGETS,
    prevent_initial_call=True,
    service=False,
    trigger=True,
)
def ask_delete(
    fired: Any, _a: int, _b: int, rows: list[dict], selected: list[int], run_id: str | None
) -> tuple[Any, ...]:
    """Ask before deleting the ticked runs (the list's Delete) or the run in view (the
    run's); the runs to delete wait in ``delete-ids`` for the answer."""
    ids = targets(fired == "delete-runs", rows, selected, run_id)
    if not ids:
        return False, no_update, no_update, SELECT_FIRST
    names = ", ".join(ids)
    message = f"Delete {len(ids)} run(s) and all their records? {names}. This cannot be undone."
    return True, message, ids, ""


@callback(
    NOTE,
    CHANGED,
    Output("view-run", "data", allow_duplicate=True),
    Output("tabs", "value", allow_duplicate=True),
    Input("confirm-delete", "submit_n_clicks"),
    State("delete-ids", "data"),
    State("view-run", "data"),
    State("token", "value"),
    prevent_initial_call=True,
)
def delete(
    svc: Service, _n: int, ids: list[str] | None, run_id: str | None, token: str | None
) -> tuple[Any, ...]:
    """Deleting was confirmed: delete; a run in view that is gone leaves for the list."""
    note = act(svc, ids or [], svc.runs.delete, "deleted", token)
    if run_id in (ids or []):
        return note, time.time(), None, "runs"
    return note, time.time(), no_update, no_update


def act(
    svc: Service, ids: list[str], action: Callable[[str], Any], done: str, token: str | None
) -> list[Any]:
    """Do ``action`` to each run; one line on what was ``done``, and what was refused."""
    if not ids:
        return failed(SELECT_FIRST, "nothing done")
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

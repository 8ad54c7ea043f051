"""Launching: a form generated from the run config (dashboard.form), presets that fill it and a
sweep grid, and every error beside the field it is about (or beside the grid)."""

from __future__ import annotations

import json
from typing import Any

from dash import ALL, Input, Output, State, dcc, html

from bncore.run.config import ConfigError, RunConfig, parse_config
from dashboard.form import PRESETS, blanks, build_form, collect
from dashboard.views.common import failed
from dashboard.wiring import callback
from server.errors import DomainError, InvalidGridPoint, Unauthorized, UnknownSweepField
from server.schemas import SweepCreate
from server.service import Service

GRID_SHAPE = 'a JSON object of field -> values: {"optim.lr": [0.1]}'
SWEEP_LINKS = 8  # runs of a sweep linked from its launch message


def layout(has_token: bool) -> html.Div:
    """The Launch tab (a token box where the server has a token)."""
    token = (
        dcc.Input(id="token", type="password", placeholder="server token")
        if has_token
        else dcc.Input(id="token", type="hidden", value="")
    )
    toolbar = [
        html.Label("Preset"),
        dcc.Dropdown(
            id="preset", options=list(PRESETS), placeholder="a single run", style={"width": "320px"}
        ),
        html.Div(
            [
                html.Label("Sweep over (JSON: field -> values)"),
                dcc.Textarea(id="grid", value="", className="grid-box"),
                html.Div(id="grid-err", className="field-error"),
            ]
        ),
        token,
        html.Button("Launch", id="launch", n_clicks=0, className="primary"),
    ]
    return html.Div(
        [
            html.Div(toolbar, className="toolbar"),
            html.Div(id="launch-result", className="banner"),
            html.Div(build_form(), id="form-box"),
        ]
    )


def run_link(run_id: str) -> dcc.Link:
    return dcc.Link(f"run {run_id}", href=f"/dashboard/?tab=run&run={run_id}")


def compare_link(run_ids: list[str]) -> dcc.Link:
    """The Compare view with these runs (a preset's point: BN against no BN)."""
    return dcc.Link(
        f"compare its {len(run_ids)} runs",
        href=f"/dashboard/?tab=compare&compare={','.join(run_ids)}",
        id="launch-compare",
    )


@callback(
    Output("form-box", "children"),
    Output("grid", "value"),
    Input("preset", "value"),
    prevent_initial_call=True,
    service=False,
)
def preset(name: str | None) -> tuple[Any, str]:
    """The form filled with a preset's base config, and its grid; a blank form without."""
    if not name:
        return build_form(), ""
    p = PRESETS[name]
    return build_form(parse_config(p["base"])), json.dumps(p["grid"])


class Marks:
    """The errors of one launch, each beside its form field (``fields``, in the form's order),
    or beside the grid for a grid key that is no form field."""

    def __init__(self, fields: list[str]) -> None:
        self.fields = fields
        self.by_field: dict[str, list[str]] = {f: [] for f in fields}
        self.grid: list[str] = []

    def mark(self, field: str, message: str) -> None:
        if field in self.by_field:
            self.by_field[field].append(message)
        else:
            self.grid.append(f"{field}: {message}" if field else message)

    def __bool__(self) -> bool:
        return any(self.by_field.values()) or bool(self.grid)

    def answer(self, banner: list[Any]) -> tuple[list[Any], list[str], str]:
        """The callback's outputs: the banner, each field's errors, the grid's."""
        return banner, ["; ".join(self.by_field[f]) for f in self.fields], "; ".join(self.grid)

    def fail(self, message: str) -> tuple[list[Any], list[str], str]:
        return self.answer(failed(message, "not launched"))


class NotAGrid(ValueError):
    """The sweep grid is JSON, but no object of field -> values."""


@callback(
    Output("launch-result", "children"),
    Output({"type": "cfg-err", "field": ALL}, "children"),
    Output("grid-err", "children"),
    Input("launch", "n_clicks"),
    State({"type": "cfg", "field": ALL}, "value"),
    State({"type": "cfg", "field": ALL}, "id"),
    State("grid", "value"),
    State("token", "value"),
    State("preset", "value"),
    prevent_initial_call=True,
)
def launch(
    svc: Service,
    _n: int,
    values: list[Any],
    ids: list[dict[str, str]],
    grid: str | None,
    token: str | None,
    preset_name: str | None = None,
) -> tuple[list[Any], list[str], str]:
    """Queue the form's run, or a sweep of it over the grid (named after the preset chosen);
    or say, beside each field, what keeps it from being launched (nothing is queued then)."""
    marks = Marks([i["field"] for i in ids])
    try:
        svc.runs.authorize(token)
    except Unauthorized:
        return marks.fail("this server needs its token to launch runs")
    for field, message in blanks(ids, values).items():
        marks.mark(field, message)
    body = collect(ids, values)
    try:
        config = parse_config(body)
    except ConfigError as exc:
        for field, message in exc.errors:
            marks.mark(field, message)
    if marks:
        return marks.fail("fix the fields marked in red")
    try:
        msg = queue(svc, body, config, grid, preset_name)
    except json.JSONDecodeError as exc:
        marks.grid.append(f"not JSON: {exc}")
        return marks.fail("fix the sweep grid")
    except NotAGrid:
        marks.grid.append(GRID_SHAPE)
        return marks.fail("fix the sweep grid")
    except InvalidGridPoint as exc:
        for field, message in exc.field_errors:
            marks.mark(field, message)
        return marks.fail(f"grid point {exc.point}: fix the fields marked in red")
    except UnknownSweepField as exc:
        marks.grid.append(exc.message)
        return marks.fail("fix the sweep grid")
    except DomainError as exc:
        return marks.fail(exc.message)
    except Exception as exc:
        return marks.fail(f"{type(exc).__name__}: {exc}")
    return marks.answer([html.Span("launched", className="status status-running"), *msg])


def queue(
    svc: Service, body: dict[str, Any], config: RunConfig, grid: str | None, name: str | None = None
) -> list[Any]:
    """Queue one run of ``config``, or a sweep ``name`` of ``body`` over the JSON ``grid``;
    what was queued, with links to the runs, and to comparing a sweep's runs."""
    if not (grid and grid.strip()):
        run = svc.runs.create(config)
        return [run_link(run["id"]), " queued: open it to watch it train"]
    points = json.loads(grid)
    if not isinstance(points, dict):
        raise NotAGrid(grid)
    sweep = svc.sweeps.create(SweepCreate(base=body, grid=points, name=name))
    ids = [r["id"] for r in sweep["runs"]]
    msg: list[Any] = [f"sweep {sweep['id']}: {len(ids)} runs queued: "]
    if len(ids) > 1:
        msg += [compare_link(ids), " or open one: "]
    for i, run_id in enumerate(ids[:SWEEP_LINKS]):
        msg += [", "] * bool(i) + [run_link(run_id)]
    return msg

"""The dashboard's views called as plain functions, on a real service (server.service.build on a
SQLite file in a temporary folder, nothing started): records go in through the service's own
ingest path, as bnscope.client sends them, and each callback is called as Dash would call it,
with the service first. No browser, no server."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dash import Dash, no_update

from bncore.record.sinks import encode
from bncore.record.tables import CHANNEL_COLUMNS, Records
from bncore.run.config import RunConfig
from bncore.science.experiments import EXPERIMENTS
from dashboard import app, data, report, wiring
from dashboard.figures.factory import has_data
from dashboard.figures.run import run_figures
from dashboard.form import build_form
from dashboard.views import (
    address,
    calculator,
    compare,
    doctor,
    experiments,
    launch,
    run,
    runs,
)
from dashboard.views.common import NEEDS_TOKEN, SELECT_FIRST, chosen
from server.errors import NotFound
from server.schemas import ClientRunCreate, SweepCreate
from server.service import Service, build
from server.settings import Settings
from tests.dashboard.test_form import _controls

LAYERS = ["block0", "block1"]


def service(folder: Path, **settings: Any) -> Iterator[Service]:
    svc = build(Settings(data_dir=folder, **settings))
    try:
        yield svc
    finally:
        svc.store.close()


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    yield from service(tmp_path)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Service]:
    """A service with a token: every change must carry it."""
    yield from service(tmp_path, token="s3cret")


def script_run(svc: Service, name: str = "script", steps: int = 30) -> str:
    """A run a script reports (bnscope.client): two layers, a loss per step, layer statistics
    every step, two evaluations and per-channel arrays at the last step."""
    created = svc.runs.create_client_run(
        ClientRunCreate(name=name, meta={"layers": LAYERS, "channels": [4, 4]}, steps_total=60)
    )
    s = np.arange(1, steps + 1)
    rows = np.repeat(s, len(LAYERS))
    n = len(rows)
    records = Records(
        steps={"step": s, "loss": np.linspace(2.3, 0.5, steps)},
        layers={"step": rows, "layer": np.array(LAYERS * steps),
                **{c: np.linspace(0.5, 1.5, n) for c in ("pre_mean", "pre_var", "grad_in_norm",
                                                         "grad_out_norm", "running_mean",
                                                         "running_var", "weight_grad_norm")}},
        evals={"step": np.array([steps // 2, steps]), "test_acc": np.array([0.4, 0.7]),
               "train_loss": np.array([1.5, 0.9])},
        channels={"step": np.array([steps] * 2), "layer": np.array(LAYERS),
                  **{c: np.ones((2, 4)) for c in CHANNEL_COLUMNS}},
    )  # fmt: skip
    answer = svc.runs.ingest(created["id"], encode(records, seq=1), created["write_token"])
    assert answer["stored"]
    return created["id"]


def queued_run(svc: Service, steps: int = 50) -> str:
    return svc.runs.create(RunConfig(steps=steps))["id"]


def text(component: Any) -> str:
    """The words of a Dash component tree (or a list of them), as the page shows them."""
    if component is None or component is no_update:
        return ""
    if isinstance(component, str | int | float):
        return str(component)
    if isinstance(component, list | tuple):
        return "".join(text(c) for c in component)
    return text(getattr(component, "children", None))


# -- the runs list -------------------------------------------------------------------------------


def test_the_runs_table_has_a_row_per_run_newest_first(svc):
    ran = script_run(svc)
    waiting = queued_run(svc)
    rows = runs.refresh(svc, 1, None, None, None, [])
    assert [r["id"] for r in rows] == [waiting, ran]
    queued, scripted = rows
    assert queued["status"] == "queued" and queued["eta"] == "queued, #1"
    assert queued["progress"] == "0/50" and queued["model"].startswith("mlp ")
    assert scripted["status"] == "running" and scripted["progress"] == "30/60"
    assert scripted["model"] == "client" and scripted["eta"].startswith("about ")


def test_a_sweep_is_one_row_that_unfolds_and_a_click_on_a_name_opens_its_run(svc):
    """Ten runs of an experiment do not push the others down: its sweep is one row, at its
    newest run's place; a click on it shows its runs, a click on a run's name opens it."""
    before = queued_run(svc)
    sweep = svc.sweeps.create(SweepCreate(name="bs", base={"steps": 20},
                                          grid={"batch_size": [16, 32, 64]}))  # fmt: skip
    members = [r["id"] for r in sweep["runs"]]
    after = queued_run(svc)
    rows = runs.refresh(svc, 1, None, None, None, [])
    assert [r["id"] for r in rows] == [after, sweep["id"], before]
    group = rows[1]
    assert group["name"] == "▸ bs (3 runs)" and group["status"] == "3 queued"
    assert sorted(group["runs"].split(",")) == sorted(members)
    assert chosen(rows, [1]) == group["runs"].split(",")  # ticked: its runs, to compare
    cell = {"row": 1, "column": 1, "column_id": "name", "row_id": sweep["id"]}
    keep = (no_update, no_update)
    assert runs.clicked(cell, rows, []) == (*keep, [sweep["id"]], None, [])
    assert group["model"] == "", "its runs differ in their model's batch size"
    rows = runs.refresh(svc, 1, None, None, None, [sweep["id"]])
    assert [r["id"] for r in rows][2:5] == group["runs"].split(",")
    assert rows[1]["name"].startswith("▾ bs") and rows[2]["name"].startswith("└ batch_size=")
    assert runs.clicked(cell, rows, [sweep["id"]]) == (*keep, [], None, [])  # folded again
    opened = {"row": 2, "column": 0, "column_id": "id", "row_id": rows[2]["id"]}
    assert runs.clicked(opened, rows, [sweep["id"]]) == (rows[2]["id"], "run", no_update, None, [])
    status = {**opened, "column_id": "status"}
    assert runs.clicked(status, rows, []) == (no_update,) * 5  # only the id and name open


def test_cancel_from_the_list_and_from_the_run_view(svc):
    first, second = queued_run(svc), queued_run(svc)
    rows = data.runs(svc)
    picked = [i for i, r in enumerate(rows) if r["id"] == first]
    note, other, changed = runs.cancel(svc, "cancel-runs", 1, 0, rows, picked, None, None)
    assert text(note) == f"cancelled: {first}" and other is no_update and changed
    assert svc.runs.get(first)["status"] == "cancelled"
    other, note, _ = runs.cancel(svc, "run-cancel", 0, 1, rows, [], second, None)
    assert text(note) == f"cancelled: {second}" and other is no_update
    # a run that has ended is refused, with the service's reason
    note, _, _ = runs.cancel(svc, "cancel-runs", 2, 1, rows, picked, None, None)
    assert text(note) == f"refusedrun {first} has already ended (cancelled)"
    note, _, _ = runs.cancel(svc, "cancel-runs", 3, 1, rows, [], None, None)
    assert text(note) == f"nothing done{SELECT_FIRST}"


def test_acting_on_runs_needs_the_server_s_token(guarded):
    run_id = queued_run(guarded)
    rows = data.runs(guarded)
    note, _, _ = runs.cancel(guarded, "cancel-runs", 1, 0, rows, [0], None, "wrong")
    assert text(note) == f"nothing done{NEEDS_TOKEN}"
    assert guarded.runs.get(run_id)["status"] == "queued"
    note, _, _ = runs.cancel(guarded, "cancel-runs", 2, 0, rows, [0], None, "s3cret")
    assert text(note) == f"cancelled: {run_id}"


def test_delete_asks_first_then_deletes_and_leaves_the_run_view(svc):
    done, active = queued_run(svc), queued_run(svc)
    svc.runs.cancel(done)
    rows = data.runs(svc)
    both = [i for i, r in enumerate(rows) if r["id"] in (done, active)]
    shown, message, ids, note = runs.ask_delete("delete-runs", 1, 0, rows, both, None)
    assert shown and set(ids) == {done, active} and note == ""
    assert message.startswith("Delete 2 run(s) and all their records?") and done in message
    assert runs.ask_delete("delete-runs", 2, 0, rows, [], None)[::3] == (False, SELECT_FIRST)
    assert runs.ask_delete("run-delete", 0, 1, rows, [], done)[2] == [done]
    note, changed, view, tab = runs.delete(svc, 1, ids, done, None)
    assert text(note) == (
        f"deleted: {done}refusedrun {active} is queued: cancel it before deleting"
    )
    assert (view, tab) == (None, "runs") and changed  # the run in view is gone: to the list
    with pytest.raises(NotFound):
        svc.runs.get(done)
    note, _, view, tab = runs.delete(svc, 2, [active], done, None)
    assert view is no_update and tab is no_update


# -- which view: links and buttons ---------------------------------------------------------------


def test_a_link_opens_its_view_and_buttons_open_the_ticked_runs():
    rows = [{"id": "aaa"}, {"id": "bbb"}]
    now = (None, None, "runs", "overview")
    search = "?tab=run&run=aaa&section=layer&layer=block1"
    assert address.open_runs("url", 0, 0, search, rows, [], *now) == (
        "aaa", no_update, "run", "layer", "block1", ""
    )  # fmt: skip
    assert address.open_runs(None, 0, 0, "?run=aaa", rows, [], "aaa", None, "run", "overview") == (
        (no_update,) * 5 + ("",)
    )  # already open
    assert address.open_runs(None, 0, 0, "?compare=aaa,bbb", rows, [], *now)[1:3] == (
        ["aaa", "bbb"], "compare"
    )  # fmt: skip
    assert address.open_runs("open-run", 1, 0, "", rows, [], *now)[5] == SELECT_FIRST
    assert address.open_runs("open-run", 1, 0, "", rows, [1], *now)[:3] == ("bbb", no_update, "run")
    assert "two or more" in address.open_runs("open-compare", 0, 1, "", rows, [1], *now)[5]
    assert address.open_runs("open-compare", 0, 1, "", rows, [0, 1], *now)[1] == ["aaa", "bbb"]
    assert address.view_of({"tab": "nowhere", "section": "nosuch"}).tab is None
    assert address.view_of({"section": "nosuch"}).section is None


def test_the_address_bar_follows_the_view():
    assert address.follow_view("aaa", None, "run", "layer", "block1", None, "") == (
        "?tab=run&run=aaa&section=layer&layer=block1"
    )
    assert address.follow_view("aaa", None, "run", "overview", "block1", None, None) == (
        "?tab=run&run=aaa&section=overview"
    )
    assert address.follow_view("aaa", ["a", "b"], "compare", "overview", None, None, None) == (
        "?tab=compare&compare=a,b"
    )
    assert address.follow_view(None, None, "runs", "overview", None, None, "?tab=runs") is (
        no_update
    )
    # an experiment's result has an address of its own, and a link to it opens it
    assert address.follow_view("aaa", None, "experiments", "overview", None, "swp1", "") == (
        "?tab=experiments&sweep=swp1"
    )
    assert address.view_of({"sweep": "swp1"}).tab == "experiments"


def test_the_page_opens_on_the_view_its_link_names(svc):
    page = app.layout(svc, "?run=aaa&section=layer&layer=block1")
    tabs = next(c for c in page.children if getattr(c, "id", None) == "tabs")
    assert tabs.value == "run"
    stores = {c.id: c.data for c in page.children if type(c).__name__ == "Store"}
    assert stores["view-run"] == "aaa" and stores["want-layer"] == "block1"
    assert set(stores) == set(app.STORES)
    assert "there is no run with id 'aaa'" in text(page["run-banner"].children)


def test_a_link_s_run_comes_drawn_with_the_page(svc):
    """The page's layout holds the link's run drawn (its open section's figures, what feeds
    them live, banner, layers, Diagnosis panel), and the callbacks that would draw it are not
    called as the page mounts (a first round of callbacks before the first paint)."""
    run_id = script_run(svc)
    page = app.layout(svc, f"?run={run_id}")
    assert page["fig-loss"].figure["data"][0]["x"][:2] == [1, 2]
    assert all(has_data(page[g].figure) for g in ("fig-heat-var", "fig-depth"))
    assert not hasattr(page["fig-layer"], "figure"), "only the open section is drawn"
    stores = {c.id: c.data for c in page.children if type(c).__name__ == "Store"}
    assert stores["live-spec"]["run"] == run_id and stores["live-spec"]["specs"]
    assert page["layer-select"].options == LAYERS and page["run-cancel"].disabled is False
    assert text(page["run-banner"].children).startswith("runningscript")
    assert page["doctor-panel"].children, "the Diagnosis panel"
    for fn in (run.render_run, doctor.show_doctor):
        assert fn.__dash_wiring__.prevent_initial_call is True, fn.__name__
    nothing_open = app.layout(svc, "?tab=runs")
    assert text(nothing_open["run-banner"].children).startswith("Pick a run")
    assert nothing_open["run-cancel"].disabled is True
    assert nothing_open["cell-fig-replicas"].style == run.HIDDEN


# -- one run -------------------------------------------------------------------------------------


def test_the_run_view_of_a_run_with_records(svc):
    run_id = script_run(svc)
    view = data.run_view(svc, run_id, None)
    assert view["layers"] == LAYERS and view["layer"] == "block0" and view["last_step"] == 30
    steps, loss = view["lines"]["loss"]
    assert len(steps) == 30 and loss[0] == pytest.approx(2.3)
    assert view["heat"]["pre_var"].shape == (len(view["heat_steps"]), 2)
    assert 25 <= len(view["heat_steps"]) <= 30 and view["heat_steps"][-1] <= 30
    assert view["depth"]["grad_in_norm"] == [pytest.approx(1.5 - 1 / 59), pytest.approx(1.5)]
    assert [r["layer"] for r in view["channels"]] == LAYERS
    assert view["evals"]["test_acc"][1].tolist() == pytest.approx([0.4, 0.7])
    with pytest.raises(NotFound):
        data.run_view(svc, "nosuchrun", None)


def test_gradients_through_depth_are_the_latest_measured(svc):
    """A script measured the gradients at steps 1 and 21 only (NaN at its other steps, its
    last one too): the figure draws step 21's, and says nothing is missing."""
    created = svc.runs.create_client_run(
        ClientRunCreate(name="grads", meta={"layers": LAYERS}, steps_total=30)
    )
    s = np.arange(1, 31)
    rows = np.repeat(s, len(LAYERS))
    grads = np.where(np.isin(rows, (1, 21)), np.linspace(1.0, 2.0, len(rows)), np.nan)
    records = Records(
        steps={"step": s, "loss": np.linspace(2.3, 0.5, 30)},
        layers={"step": rows, "layer": np.array(LAYERS * 30), "pre_var": np.ones(len(rows)),
                "grad_in_norm": grads, "grad_out_norm": grads * 2},
    )  # fmt: skip
    svc.runs.ingest(created["id"], encode(records, seq=1), created["write_token"])
    view = data.run_view(svc, created["id"], None)
    at_21 = grads[rows == 21]
    assert view["depth"]["grad_in_norm"] == pytest.approx(list(at_21))
    assert view["depth"]["grad_out_norm"] == pytest.approx(list(at_21 * 2))
    figs, _ = run_figures(view)
    assert figs["fig-depth"]["data"][0]["y"] == pytest.approx(list(at_21 * 2))
    assert not figs["fig-depth"]["layout"].get("annotations"), "no 'not recorded' note"


def test_render_run_draws_the_open_section_and_says_how_it_grows(svc):
    run_id = script_run(svc)
    out = run.render_run(svc, run_id, None, None, "overview", "block1")
    figs = dict(zip(run.GRAPHS, out, strict=False))
    spec, options, layer, banner, report, replicas_cell, cancel_off = out[len(run.GRAPHS) :]
    assert replicas_cell == run.HIDDEN, "no replicas panel on a run of one process"
    assert cancel_off is False, "a running run can be cancelled"
    for graph in run.GRAPHS:
        drawn = graph in run.SECTIONS["overview"]
        assert (figs[graph] is not no_update) == drawn, graph
    assert len(figs["fig-loss"]["data"][0]["x"]) == 30
    assert spec["run"] == run_id and spec["layers"] == LAYERS
    assert {s["graph"] for s in spec["specs"]} <= set(run.SECTIONS["overview"])
    assert options == LAYERS and layer == "block1"  # the layer the link asked for
    assert text(banner).startswith(f"runningscript  ·  id {run_id}  ·  step 30 of 60")
    assert report == f"/api/runs/{run_id}/report"
    out = run.render_run(svc, run_id, "block0", None, "layer", None)
    layer_fig = out[run.GRAPHS.index("fig-layer")]
    assert layer_fig["layout"]["title"]["text"].startswith("block0:")
    assert {s.get("layer") for s in out[len(run.GRAPHS)]["specs"]} == {"block0"}


def test_a_run_before_its_first_record_says_what_it_is_doing(svc):
    """The first seconds of a launch: no figure shows empty axes with ranges plotly invented;
    each says, as the banner does, whether the run is queued, its worker starting, or its first
    records awaited, and the page draws all again at the first records (the spec's waiting)."""
    queued = queued_run(svc)
    out = run.render_run(svc, queued, None, None, "overview", None)
    spec, banner = out[len(run.GRAPHS)], out[len(run.GRAPHS) + 3]
    assert spec["waiting"].startswith("queued") and "#1 in the queue" in text(banner)
    for graph in run.SECTIONS["overview"]:
        fig = out[run.GRAPHS.index(graph)]
        axes = [a for k, a in fig["layout"].items() if k[1:5] == "axis"]
        assert axes and all(a["visible"] is False for a in axes), graph
        assert fig["layout"]["annotations"][0]["text"].startswith("queued (#1 in the queue)")
        assert fig["data"], "its traces stay, for the stream to extend"
    created = svc.runs.create_client_run(ClientRunCreate(name="s", meta={}, steps_total=5))
    out = run.render_run(svc, created["id"], None, None, "overview", None)
    note = "waiting for the script's first records"
    assert note in text(out[len(run.GRAPHS) + 3])
    assert out[0]["layout"]["annotations"][0]["text"].startswith(note)
    worker = {"status": "running", "source": "worker", "meta": {}, "steps_done": 0}
    assert run.starting(worker).startswith("the worker is starting")
    assert "waiting for the first records" in run.starting({**worker, "meta": {"layers": ["a"]}})
    assert run.starting({**worker, "status": "failed"}).startswith("the run ended (failed)")
    first = {"status": "queued", "queue_position": 0, "queued_for": "workers"}
    assert run.starting(first).startswith("queued: the server's workers are starting")
    with_records = run.render_run(svc, script_run(svc), None, None, "overview", None)
    assert with_records[len(run.GRAPHS)]["waiting"] == ""
    assert "visible" not in with_records[0]["layout"]["yaxis"]


def test_render_run_of_no_run_says_so(svc):
    out = run.render_run(svc, "nosuchrun", None, None, "overview", None)
    figs, (spec, options, layer, banner, report, _, cancel_off) = (
        out[: len(run.GRAPHS)],
        out[len(run.GRAPHS) :],
    )
    assert cancel_off is True
    assert all(f["layout"]["annotations"][0]["text"] == "no run to show" for f in figs)
    assert spec is None and options == [] and layer is None and report == ""
    assert "there is no run with id 'nosuchrun'" in text(banner)
    nothing_open = run.render_run(svc, None, None, None, "overview", None)
    assert text(nothing_open[len(run.GRAPHS) + 3]).startswith("Pick a run in the Runs tab")


def test_the_stream_s_status_redraws_when_layers_become_known_or_the_run_ends():
    running = {"id": "r", "status": "running", "steps_done": 3, "meta": {"layers": ["a"]}}
    banner, redraw, cancel_off = run.live_status(running, {"run": "r", "layers": []})
    assert "running" in text(banner) and redraw is not no_update and cancel_off is False
    drawn = {"run": "r", "layers": ["a"], "status": "running"}
    assert run.live_status(running, drawn)[1] is no_update
    ended = run.live_status({**running, "status": "completed"}, drawn)
    assert ended[1] is not no_update and ended[2] is True, "drawn once more; Cancel disabled"
    # a run already ended when it was drawn is not drawn again (opening it fetches it once)
    assert (
        run.live_status({**running, "status": "completed"}, {**drawn, "status": "completed"})[1]
        is no_update
    )
    # nor is a run whose drawing has not come back yet (it reads the store as it is now)
    assert run.live_status({**running, "status": "completed"}, None)[1] is no_update
    assert run.live_status({**running, "status": "completed"}, {"run": "other"})[1] is no_update
    assert run.live_status(None, None) == (no_update, no_update, no_update)
    starting = {"id": "r", "status": "running", "steps_done": 0, "meta": {}}
    assert run.live_status(starting, {"run": "r", "layers": [], "waiting": "queued"})[1] is not (
        no_update
    )
    said = {"run": "r", "layers": [], "waiting": run.starting(starting)}
    assert run.live_status(starting, said)[1] is no_update
    assert run.server_back(1, None) is no_update and run.server_back(1, "r")


# -- comparing -----------------------------------------------------------------------------------


def test_compare_overlays_runs_and_names_the_missing(svc):
    a, b = script_run(svc, "a"), script_run(svc, "b")
    out = compare.compare(svc, [a, b, "nosuchrun"], "pre_var", "block1")
    loss, _acc, stat, layers, layer, note, style = out
    assert [t["name"] for t in loss["data"]] == ["a (running)", "b (running)"]
    assert [t["name"] for t in stat["data"]] == ["a (running) block1", "b (running) block1"]
    assert layers == LAYERS and layer == "block1" and style == {}
    assert "'nosuchrun'" in text(note) and text(note).startswith("not found")
    hint = compare.compare(svc, None, "pre_var", None)
    assert hint[5] == compare.HINT and hint[6] == {"display": "none"}


# -- launching -----------------------------------------------------------------------------------


def form(**changes: Any) -> tuple[list[dict[str, str]], list[Any]]:
    """The launch form's ids and values, untouched but for ``changes`` (dots as __)."""
    controls = _controls(build_form())
    edited = {k.replace("__", "."): v for k, v in changes.items()}
    ids = [i for i, _ in controls]
    return ids, [edited.get(i["field"], v) for i, v in controls]


def errors_by_field(ids: list[dict[str, str]], errors: list[str]) -> dict[str, str]:
    return {i["field"]: e for i, e in zip(ids, errors, strict=True) if e}


def test_launch_queues_a_run_and_links_to_it(svc):
    ids, values = form(steps=40)
    banner, errors, grid_error = launch.launch(svc, 1, values, ids, "", None)
    (queued,) = svc.runs.newest(10)
    assert queued["config"]["steps"] == 40 and queued["status"] == "queued"
    assert text(banner) == f"launchedrun {queued['id']} queued: open it to watch it train"
    assert not any(errors) and grid_error == ""


def test_launch_a_sweep_with_a_field_it_does_not_know(svc):
    ids, values = form(steps=40)
    banner, errors, grid_error = launch.launch(svc, 1, values, ids, '{"steps.x": [1]}', None)
    assert text(banner) == "not launchedfix the sweep grid"  # UnknownSweepField
    assert grid_error == "sweep key 'steps.x': steps is not a group of fields"
    assert not any(errors)
    # a field no config has: beside the grid, as it is no field of the form
    banner, errors, grid_error = launch.launch(svc, 1, values, ids, '{"optim.lrr": [0.1]}', None)
    assert text(banner) == "not launchedgrid point optim.lrr=0.1: fix the fields marked in red"
    assert grid_error.startswith("optim.lrr: ") and not any(errors)
    assert svc.runs.newest(10) == []  # nothing queued


def test_launch_a_sweep_with_a_bad_point_marks_the_field(svc):
    ids, values = form(steps=40)
    grid = '{"batch_size": [32, 1]}'
    banner, errors, grid_error = launch.launch(svc, 1, values, ids, grid, None)
    assert text(banner) == "not launchedgrid point batch_size=1: fix the fields marked in red"
    marked = errors_by_field(ids, errors)
    assert list(marked) == ["batch_size"] and "greater than or equal to 2" in marked["batch_size"]
    assert grid_error == "" and svc.runs.newest(10) == []
    banner, _, _ = launch.launch(svc, 2, values, ids, '{"optim.lr": [0.1, 0.2]}', None)
    assert text(banner).startswith("launchedsweep ") and len(svc.runs.newest(10)) == 2


def test_a_preset_s_launch_links_to_comparing_its_runs(svc):
    """ "BN vs no BN" is launched to be compared: its launch links to the Compare view with
    both runs, and its sweep takes the preset's name (its row in the runs list)."""
    name = "BN vs no BN"
    _, grid = launch.preset(name)
    ids, values = form(steps=40)
    banner, errors, _ = launch.launch(svc, 1, values, ids, grid, None, name)
    runs_queued = [r["id"] for r in reversed(svc.runs.newest(10))]
    assert len(runs_queued) == 2 and not any(errors)
    link = next(c for c in _tree(banner) if getattr(c, "id", None) == "launch-compare")
    assert link.href == f"/dashboard/?tab=compare&compare={','.join(runs_queued)}"
    assert address.view_of(address.query_of(link.href.split("?")[1])).compare == runs_queued
    assert text(banner).startswith("launchedsweep ") and "compare its 2 runs" in text(banner)
    assert {r["name"].partition(": ")[0] for r in svc.runs.newest(10)} == {name}


def test_launch_marks_each_bad_field_and_each_bad_grid(svc):
    ids, values = form(steps=None, optim__lr=-1)
    banner, errors, _ = launch.launch(svc, 1, values, ids, "", None)
    marked = errors_by_field(ids, errors)
    assert text(banner) == "not launchedfix the fields marked in red"
    assert "required" in marked["steps"] and "1000" in marked["steps"]
    assert "greater than 0" in marked["optim.lr"]
    ids, values = form()
    assert launch.launch(svc, 1, values, ids, "[1, 2]", None)[2] == launch.GRID_SHAPE
    assert launch.launch(svc, 1, values, ids, "{", None)[2].startswith("not JSON")
    assert svc.runs.newest(10) == []


def test_launch_needs_the_server_s_token(guarded):
    ids, values = form()
    banner, _, _ = launch.launch(guarded, 1, values, ids, "", None)
    assert text(banner) == "not launchedthis server needs its token to launch runs"
    banner, _, _ = launch.launch(guarded, 2, values, ids, "", "s3cret")
    assert text(banner).startswith("launched")


def test_a_preset_fills_the_form_and_the_grid():
    box, grid = launch.preset("BN vs no BN")
    assert grid == '{"norm.kind": ["batch", "none"]}'
    assert dict((i["field"], v) for i, v in _controls(box))["steps"] == 1000
    assert launch.preset(None)[1] == ""


# -- experiments and the calculator --------------------------------------------------------------


def test_an_experiment_starts_from_its_button_and_shows_its_progress(svc):
    assert experiments.start(svc, "tabs", [0], "runs", "", None) == (no_update,) * 3
    options, picked, _ = experiments.start(svc, "tabs", [0], "experiments", "", None)
    assert options == [] and picked is no_update
    button = {"type": "exp-run", "key": "placement"}
    options, picked, head = experiments.start(svc, button, [1], "experiments", "", None)
    assert options[0]["value"] == picked and head is no_update
    # its result's link opens it, from the page's first call or a change of address
    for fired in (None, "url"):
        link = f"?tab=experiments&sweep={picked}"
        assert experiments.start(svc, fired, [0], "runs", link, None)[:2] == (options, picked)
    head, _, done = experiments.show(svc, picked, None)
    runs = EXPERIMENTS["placement"].runs()
    assert "queued" in text(head) and f"0 of {runs} runs finished" in text(head) and not done
    head, _, done = experiments.show(svc, "nosuchsweep", None)
    assert text(head).startswith("errorno sweep with id") and done


def test_the_calculator_shows_each_step_or_what_is_wrong():
    defaults = [value for _, value in calculator.PARAMS]
    out = calculator.compute("1, 4, 6", *defaults)
    assert "mean = sum(x) / N = 11 / 3" in text(out)
    wrong = calculator.compute("1, 2, oops", *defaults)
    assert wrong.id == "calc-error" and "not a list of numbers" in text(wrong)
    assert text(calculator.compute("1, 2", None, *defaults[1:])) == "set gamma to a number"


# -- wiring --------------------------------------------------------------------------------------


def test_each_view_s_callbacks_are_bound_to_the_service_at_mount(svc):
    declared = {fn.__name__ for view in app.VIEWS for fn, _ in wiring.callbacks(view)}
    assert {"refresh", "cancel", "render_run", "launch", "compare", "open_runs"} <= declared
    dash_app = Dash(__name__)
    wiring.bind(dash_app, svc, app.VIEWS)
    assert len(dash_app.callback_map) == len(declared) + 2  # and the two clientside ones
    assert "runs-table.data" in dash_app.callback_map
    bound = dash_app.callback_map["runs-table.data"]["callback"]
    assert bound.__wrapped__.__name__ == "refresh"
    script_run(svc)
    rows = bound.__wrapped__(1, None, None, None)  # as Dash calls it: the inputs' values only
    assert [r["status"] for r in rows] == ["running"]


# -- the BN doctor (issue 26) --------------------------------------------------------------------


def nan_buffers_run(svc: Service) -> str:
    """A script's run whose block1 running mean is NaN from step 12 on, its loss finite."""
    created = svc.runs.create_client_run(ClientRunCreate(name="nan", meta={"layers": LAYERS}))
    s = np.arange(1, 21)
    rows = np.repeat(s, 2)
    mean = np.where((rows >= 12) & (np.tile(LAYERS, 20) == "block1"), np.nan, 0.1)
    records = Records(
        steps={"step": s, "loss": np.full(20, 1.0)},
        layers={"step": rows, "layer": np.array(LAYERS * 20), "running_mean": mean,
                "running_var": np.ones(40)},
    )  # fmt: skip
    svc.runs.ingest(created["id"], encode(records, seq=1), created["write_token"])
    svc.diagnoses.report(svc.runs.get(created["id"]))  # whatever waited is diagnosed
    return created["id"]


def test_the_diagnosis_panel_the_badge_and_the_report_say_what_the_doctor_found(guarded):
    sick, healthy = nan_buffers_run(guarded), script_run(guarded)
    panel = doctor.show_doctor(guarded, sick)
    said = text(panel)
    assert "BN doctor · 1 error in 20 steps" in said and "nonfinite-running-stats" in said
    assert "block1's running statistics became non-finite at step 12" in said
    assert "reload the BN buffers" in said and "pytorch/pytorch#88474" in said
    link = next(c for c in _tree(panel) if type(c).__name__ == "Link")
    assert link.href == (f"?tab=run&run={sick}&section=layer&layer=block1&step=12"
                         "&mark=nonfinite-running-stats")  # fmt: skip
    assert "no BN problem found in 30 steps" in text(doctor.show_doctor(guarded, healthy))
    rows = {r["id"]: r for r in data.runs(guarded)}
    assert rows[sick]["doctor"] == "1 error" and rows[healthy]["doctor"] == ""
    assert "Diagnosis (BN doctor)" in report.render(guarded, sick)

    # silencing needs the server's token; silenced, it leaves the badge
    toggle = {"type": "doctor-silence", "rule": "nonfinite-running-stats", "to": "on"}
    changed, note = doctor.toggle_silence(guarded, toggle, [1], [toggle], sick, "wrong")
    assert changed is no_update and NEEDS_TOKEN in text(note)
    assert doctor.toggle_silence(guarded, toggle, [0], [toggle], sick, "s3cret") == (no_update,) * 2
    changed, _ = doctor.toggle_silence(guarded, toggle, [1], [toggle], sick, "s3cret")
    assert changed is not no_update
    assert "no active BN problem in 20 steps (1 silenced)" in text(
        doctor.show_doctor(guarded, sick)
    )
    assert {r["id"]: r for r in data.runs(guarded)}[sick]["doctor"] == ""

    # a layer link marks its step, on the figures over steps of the layer it opens
    search = f"?tab=run&run={sick}&section=layer&layer=block1&step=12&mark=rule-x"
    marked, layer = doctor.step_from_link(search)
    assert layer == "block1" and marked["step"] == 12
    out = run.render_run(guarded, sick, layer, None, "layer", None, marked)
    fig = out[run.GRAPHS.index("fig-layer")]
    assert [s["x0"] for s in fig["layout"]["shapes"]] == [12]
    assert any(a["text"] == "rule-x at step 12" for a in fig["layout"]["annotations"])
    assert address.follow_view(sick, None, "run", "layer", "block1", None, "", marked).endswith(
        "&step=12&mark=rule-x"
    )


def _tree(component: Any) -> Iterator[Any]:
    """Every component of a tree (or a list of them)."""
    if isinstance(component, list | tuple):
        for c in component:
            yield from _tree(c)
    elif hasattr(component, "children"):
        yield component
        yield from _tree(component.children)


@pytest.mark.parametrize(
    "meta",
    [
        {"replicas": "abc"},
        {"tracked_units": 5},
        {"not_recorded": "x"},
        {"layers": 5},
        {"layers": "block0"},
        {"structure": {"activation": 3}},
        {"distributed": {"world": "two"}},
        {"replicas": 1_000_000},
        {"tracked_units": [[0] * 30_000]},
        {"layers": [f"l{i}" for i in range(20_000)]},
        [1, 2],
    ],
)
def test_a_stored_meta_of_any_shape_is_read_at_the_cost_of_the_records(svc, meta):
    """A meta stored before it was checked (or by hand) is never trusted: the run view and the
    report draw what is stored, in about the time they take for the same run with its own
    meta (the report took 28 s and 400 MB for ``tracked_units: [[0] * 30000]``, 11 s and then
    a 500 for ``replicas: 1000000``)."""
    import time

    def seconds(run_id: str) -> float:
        start = time.perf_counter()
        view = data.run_view(svc, run_id, None)
        assert view["layers"] == LAYERS and len(view["lines"]["loss"][0]) == 30
        assert "loss" in report.render(svc, run_id)
        return time.perf_counter() - start

    plain, hostile = script_run(svc, "plain"), script_run(svc, "hostile")
    svc.store.runs.update(hostile, meta=meta)
    seconds(plain)  # warm
    assert seconds(hostile) < 3 * seconds(plain) + 0.5
    assert svc.records.layers(hostile)["layers"] is not None  # the API's listing too
    assert svc.diagnoses.report(svc.runs.get(hostile))["steps"] is not None


def test_the_report_draws_each_figure_as_the_dashboard_does_with_its_caption(svc):
    """One figure factory for both: the report's mean heatmap has the dashboard's explicit
    colour scale (a named one was read the other way round by plotly.py), and each figure
    says what to look for, as the run view's captions do."""
    from bncore.statistics import LOOK_FOR

    run_id = script_run(svc)
    figs, _ = run_figures(data.run_view(svc, run_id, None))
    page = report.render(svc, run_id)
    scales = [json.loads(m) for m in re.findall(r'"colorscale":(\[\[.*?\]\])', page)]
    assert figs["fig-heat-mean"]["data"][0]["colorscale"] in scales
    assert html.escape(f"Look for {LOOK_FOR['pre_mean']}.") in page


def test_each_caption_links_to_its_statistic_on_the_statistics_page():
    from dashboard import glossary
    from dashboard.figures.run import ABOUT, about

    page, view = glossary.statistics_html(), run.layout(None)
    for graph in run.GRAPHS:
        found = [c for c in _tree(view) if getattr(c, "id", None) == f"cell-{graph}"]
        (link,) = [c for c in _tree(found[0]) if type(c).__name__ == "A"]
        anchor = link.href.split("#")[1]
        assert link.href.startswith("/dashboard/statistics#") and anchor == about(graph).anchor
        assert f"<tr id='{anchor}'>" in page, graph
        assert ABOUT[graph] in page

"""The run view's figures, drawn from a small view (as dashboard.data.run_view returns it):
each figure is declared once, so its trace names come from the statistics registry, its live
spec names the very columns its traces draw, and an empty figure says why it is empty."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bncore import statistics
from bncore.statistics import CHANNEL_STATISTICS, STATISTICS
from dashboard import data
from dashboard.figures.compare import compare_figures
from dashboard.figures.declare import SOURCES, Latest, Lines
from dashboard.figures.experiment import experiment_figure
from dashboard.figures.factory import (
    EARLIER,
    LOG_TICKS,
    SCALES,
    TITLE_LINE,
    nothing,
    plain,
    wrapped,
)
from dashboard.figures.run import ABOUT, ALSO, RUN_FIGURES, about, run_figures
from dashboard.views.run import GRAPHS

LAYERS = ["a", "b", "c"]
STEPS = np.arange(1, 21)


def _xy(scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    return STEPS, np.linspace(1, 2, len(STEPS)) * scale


def small_view(
    layer: str | None = "b",
    replicas: int = 2,
    units: int = 2,
    evals: bool = True,
    blocks: bool = True,
    last_step: int = 20,
    meta: dict | None = None,
) -> dict:
    """A run view with every table filled: three layers, 20 steps, two evaluations."""
    detail: dict[str, Any] = {}
    if layer:
        detail = {s: _xy(1 + i / 10) for i, s in enumerate(data.LAYER_STATS)}
        detail |= {f"p{q}_{j}": _xy(q / 50 + j) for q in (15, 50, 85) for j in range(units)}
        if replicas > 1:
            detail |= {s: _xy(0.1) for s in data.REPLICA_STATS}
            detail |= {f"r{k}_pre_var": _xy(1 + k) for k in range(replicas)}
    no_evals = (np.array([], np.int64), np.array([]))
    block = {"layers": LAYERS, "first": [1.0, 2.0, 3.0], "last": [2.0, 3.0, 4.0],
             "first_step": 10, "last_step": 20}  # fmt: skip
    nothing_at = {"layers": [], "first": [], "last": [], "first_step": 0, "last_step": 0}
    return {
        "run": {"id": "r1", "meta": meta or {}, "status": "completed"},
        "layers": LAYERS,
        "layer": layer,
        "last_step": last_step,
        "heat_steps": STEPS.astype(float),
        "heat": {s: np.linspace(0.5, 2, 60).reshape(20, 3) for s in data.HEAT_STATS},
        "depth": {"grad_in_norm": [1.0, 2.0, None], "grad_out_norm": [2.0, 3.0, 4.0]},
        "lines": {"loss": _xy()},
        "evals": {s: (np.array([10, 20]), np.array([0.5, 0.6])) if evals else no_evals
                  for s in data.EVAL_STATS},
        "detail": detail,
        "channels": [{"layer": name, "step": 20, "pre_mean": np.arange(4.0),
                      "pre_var": np.arange(1.0, 5.0)} for name in LAYERS],
        "by_block": {s: block if blocks else nothing_at for s in data.BLOCK_EVAL_STATS},
    }  # fmt: skip


def names(fig: dict) -> list[str]:
    return [t.get("name") for t in fig["data"]]


def notes(fig: dict) -> str:
    """A figure's notes, as read (a long one is wrapped in lines)."""
    return " ".join(a["text"].replace("<br>", " ") for a in fig["layout"].get("annotations", []))


def test_every_graph_of_the_run_view_gets_a_figure_and_each_spec_feeds_one():
    figs, specs = run_figures(small_view())
    assert set(figs) == set(GRAPHS)
    assert {s["graph"] for s in specs} == set(GRAPHS) - {"fig-population", "fig-signal"}
    assert {d.graph for d in RUN_FIGURES} | set(ALSO) == set(GRAPHS)


def test_trace_names_are_the_registry_s_labels():
    figs, _ = run_figures(small_view())
    label = {name: s.label for name, s in STATISTICS.items()}
    assert names(figs["fig-loss"]) == [label["loss"], label["train_loss"], label["test_loss"]]
    assert names(figs["fig-acc"]) == [
        label[s]
        for s in ("train_acc", "test_acc", "mode_gap", "test_acc_precise", "test_acc_batch")
    ]
    assert names(figs["fig-grads"]) == [
        label[s] for s in ("weight_grad_norm", "gamma_grad_norm", "beta_grad_norm", "weight_norm")
    ]
    assert names(figs["fig-layer"])[0] == "BN input mean (batch)" == label["pre_mean"]
    assert names(figs["fig-depth"]) == [label["grad_out_norm"], label["grad_in_norm"]]
    assert names(figs["fig-signal"])[:2] == [f"{label['signal_var']}, step {s}" for s in (20, 10)]
    # every line without a name of its own is named by the registry, whatever the figure
    view = small_view()
    for declared in RUN_FIGURES:
        if isinstance(declared, Lines | Latest):
            lines = declared.lines_of(view) if isinstance(declared, Lines) else declared.lines
            for ln, name in zip(lines, names(figs[declared.graph]), strict=True):
                assert name == (ln.label or STATISTICS[ln.stat].label), (declared.graph, ln)


def test_the_run_view_reads_every_statistic_its_figures_draw():
    read = {
        "steps": {"loss"},  # the view's "lines"
        "evals": set(data.EVAL_STATS),
        "layers": {*data.LAYER_STATS, *data.REPLICA_STATS},
    }
    view = small_view()
    for declared in RUN_FIGURES:
        if isinstance(declared, Lines):
            for ln in declared.lines_of(view):
                if statistics.PERCENTILE.fullmatch(ln.stat) or statistics.REPLICA.fullmatch(
                    ln.stat
                ):
                    continue  # read per unit and per replica the run has
                assert ln.stat in read[ln.table], (declared.graph, ln.stat)


def test_the_replicas_and_units_are_named_as_the_page_shows_them():
    figs, _ = run_figures(small_view(replicas=2, units=2))
    assert names(figs["fig-replicas"])[:3] == ["global batch", "replica 0", "replica 1"]
    assert names(figs["fig-pct"]) == [
        "unit 0 15%", "unit 0: 15-85% of the batch", "unit 0: median",
        "unit 1 15%", "unit 1: 15-85% of the batch", "unit 1: median",
    ]  # fmt: skip
    assert [t["visible"] for t in figs["fig-pct"]["data"]] == [True] * 3 + ["legendonly"] * 3


def _column(view: dict, table: str, column: str) -> list[Any]:
    return plain(np.asarray(view[SOURCES[table]][column][1], dtype=float))


def test_each_line_spec_feeds_the_trace_that_draws_its_column():
    view = small_view()
    figs, specs = run_figures(view)
    lines = [s for s in specs if s["kind"] == "line"]
    assert {s["graph"] for s in lines} >= {"fig-loss", "fig-acc", "fig-layer", "fig-pct"}
    for spec in lines:
        fig = figs[spec["graph"]]
        assert len(spec["columns"]) == len(spec["traces"]) > 0
        for column, index in zip(spec["columns"], spec["traces"], strict=True):
            stat = statistics.lookup(column)
            assert stat is not None and stat.table == spec["table"], (spec["graph"], column)
            assert fig["data"][index]["y"] == _column(view, spec["table"], column)
        assert spec.get("layer") == ("b" if spec["table"] == "layers" else None)
    loss = [s for s in lines if s["graph"] == "fig-loss"]
    assert [(s["table"], s["columns"], s["traces"]) for s in loss] == [
        ("steps", ["loss"], [0]),
        ("evals", ["train_loss", "test_loss"], [1, 2]),
    ]


def test_heat_latest_and_channel_specs_name_columns_of_the_registry():
    view = small_view()
    figs, specs = run_figures(view)
    for spec in specs:
        if spec["kind"] == "heat":
            stat = STATISTICS[spec["column"]]
            assert stat.table == spec["table"] == "layers" and spec["log"] == stat.log
            z = np.array(figs[spec["graph"]]["data"][0]["z"], dtype=float)
            raw = view["heat"][spec["column"]]
            np.testing.assert_allclose(z, np.log10(raw) if stat.log else raw, atol=1e-6)
            assert spec["layers"] == LAYERS == figs[spec["graph"]]["data"][0]["y"]
        elif spec["kind"] == "latest":
            assert all(STATISTICS[c].table == spec["table"] for c in spec["columns"])
            ys = [t["y"] for t in figs[spec["graph"]]["data"]]
            assert ys == [view["depth"][c] for c in spec["columns"]]
        elif spec["kind"] == "channels":
            assert spec["table"] == "channels" and {"pre_mean", "pre_var"} <= set(
                CHANNEL_STATISTICS
            )
            assert figs["fig-channels"]["layout"]["title"]["text"].startswith(spec["title"])
    kinds = {s["graph"]: s["kind"] for s in specs}
    assert kinds["fig-heat-var"] == "heat" and kinds["fig-depth-2"] == "latest"
    assert [s["column"] for s in specs if s["kind"] == "heat"] == list(data.HEAT_STATS)


LOG_AXES = {
    "fig-loss": {"yaxis"},
    "fig-acc": {"yaxis2"},
    "fig-depth": {"yaxis"},
    "fig-depth-2": {"yaxis"},
    "fig-grads": {"yaxis"},
    "fig-scale": {"yaxis", "yaxis2"},
    "fig-replicas": {"yaxis2"},
    "fig-population": {"yaxis"},
    "fig-signal": {"yaxis"},
}


def test_log_axes_are_where_they_were_declared_with_few_tick_labels():
    figs, _ = run_figures(small_view())
    for graph, fig in figs.items():
        axes = {k: a for k, a in fig["layout"].items() if k[1:5] == "axis"}
        log = {k for k, a in axes.items() if a.get("type") == "log"}
        assert log == LOG_AXES.get(graph, set()), graph
        for key in log:
            assert {k: axes[key][k] for k in LOG_TICKS} == LOG_TICKS, (graph, key)
    assert STATISTICS["loss"].log and STATISTICS["weight_grad_norm"].log
    assert figs["fig-heat-var"]["layout"]["yaxis"]["type"] == "category"  # layer names


def test_every_log_axis_of_every_figure_takes_the_one_tick_rule():
    """Loss, mode gap, compare and experiment panels alike: no figure sets its own log ticks
    (what plotly.js then draws: test_every_log_axis_labels_whole_numbers_few_of_them)."""
    assert LOG_TICKS["nticks"] <= 3 and LOG_TICKS["minorloglabels"] == "complete"
    run = {"name": "bn", "status": "completed", "layer": "b", "loss": _xy(), "test_acc": _xy(),
           "stat": _xy()}  # fmt: skip
    panel = {"series": [{"name": "measured", "theory": False, "x": [16, 32], "y": [0.1, 0.2]}],
             "log_x": True, "log_y": True, "kind": "by_value", "title": "t", "x_label": "batch",
             "y_label": "gap"}  # fmt: skip
    figs = [*run_figures(small_view())[0].values(), *compare_figures([run], "pre_var").values(),
            experiment_figure(panel)]  # fmt: skip
    axes = [a for f in figs for k, a in f["layout"].items() if k[1:5] == "axis"]
    log = [a for a in axes if a.get("type") == "log"]
    assert len(log) >= 12
    for axis in log:
        assert {k: axis[k] for k in LOG_TICKS} == LOG_TICKS


def test_layer_figures_wait_for_a_layer():
    figs, specs = run_figures(small_view(layer=None))
    assert "fig-layer" not in figs and "fig-pct" not in figs
    assert not [s for s in specs if s.get("layer")]
    assert "fig-loss" in figs and "fig-heat-var" in figs


def test_empty_figures_say_why():
    meta = {"not_recorded": {"weight": "no linear or conv weight feeds this block"}}
    view = small_view(replicas=1, evals=False, blocks=False, meta=meta)
    for stat in ("weight_grad_norm", "gamma_grad_norm", "beta_grad_norm", "weight_norm"):
        view["detail"][stat] = (STEPS, np.full(len(STEPS), np.nan))
    figs, _ = run_figures(view)
    assert notes(figs["fig-acc"]) == "not recorded for this run"
    assert "set precise_bn" in notes(figs["fig-population"])
    assert "model.kind=resnet" in notes(figs["fig-signal"])
    assert "distributed.replicas above 1" in notes(figs["fig-replicas"])
    # a script's run has no config to set: it is told where these are measured instead
    figs, _ = run_figures({**view, "run": {**view["run"], "source": "client"}})
    for graph in ("fig-population", "fig-signal", "fig-replicas"):
        assert "BN Scope trains itself" in notes(figs[graph]) and "set " not in notes(figs[graph])
    assert notes(figs["fig-grads"]) == (
        "not recorded for this run: no linear or conv weight feeds this block"
    )
    assert notes(figs["fig-loss"]) == "" and notes(figs["fig-heat-var"]) == ""
    # an empty figure shows no axes whose ranges plotly would invent (-1 to 6; 10^-1 to 10^4)
    acc = figs["fig-acc"]["layout"]
    assert acc["xaxis"]["visible"] is False and acc["yaxis2"]["visible"] is False
    # a heatmap whose rows are named but hold no value is empty too
    view["channels"] = []
    assert notes(run_figures(view)[0]["fig-channels"]) == "not recorded for this run"
    # while the run goes on, what has not come yet may still come
    running, _ = run_figures({**view, "run": {**view["run"], "status": "running"}})
    assert notes(running["fig-acc"]) == "nothing recorded yet"
    # before any record, nothing is said: the figures are filling
    figs, _ = run_figures(small_view(evals=False, last_step=0))
    assert notes(figs["fig-acc"]) == ""
    empty = nothing("no run to show")
    assert notes(empty) == "no run to show" and empty["layout"]["xaxis"]["visible"] is False


def test_a_right_axis_with_nothing_on_it_is_hidden_where_nothing_is_to_come():
    """A run without BN has accuracies but no mode gap: its right axis would show the ticks
    of a range plotly made up (8x10^3 ... 10^-1); it is hidden, and so is its legend entry,
    once the run has ended, and while BN Scope's own run trains (its evaluations carry the gap
    with the accuracies: seen live at 1440 px on README's run). A script's running run keeps
    it: its probe may log the gap after its first evaluation."""
    view = small_view()
    view["evals"]["mode_gap"] = (np.array([10, 20]), np.array([np.nan, np.nan]))
    acc = run_figures(view)[0]["fig-acc"]
    assert acc["layout"]["yaxis2"]["visible"] is False and acc["layout"]["yaxis"].get(
        "visible", True
    )
    gap = [t for t in acc["data"] if t.get("yaxis") == "y2"]
    assert gap and all(t["showlegend"] is False for t in gap)
    running = {**view["run"], "status": "running"}
    assert (
        run_figures({**view, "run": running})[0]["fig-acc"]["layout"]["yaxis2"]["visible"] is False
    )
    script = {**running, "source": "client"}
    kept = run_figures({**view, "run": script})[0]["fig-acc"]["layout"]["yaxis2"]
    assert kept.get("visible", True)
    # a run without BN: its gap is exactly 0, which the log axis cannot draw (README's run)
    view["evals"]["mode_gap"] = (np.array([10, 20]), np.array([0.0, 0.0]))
    assert run_figures(view)[0]["fig-acc"]["layout"]["yaxis2"]["visible"] is False
    view["evals"]["mode_gap"] = (np.array([10, 20]), np.array([0.1, 0.2]))
    assert run_figures(view)[0]["fig-acc"]["layout"]["yaxis2"].get("visible", True)


def test_long_titles_and_notes_are_wrapped_to_fit_a_phone():
    """Plotly never wraps a title: every line of a figure's title and of its notes stays
    within TITLE_LINE characters (a phone's figure), its words kept whole."""
    meta = {"not_recorded": {"weight": "no linear or conv weight feeds this block"}}
    figs, _ = run_figures(small_view(replicas=1, evals=False, blocks=False, meta=meta))
    texts = [f["layout"]["title"]["text"] for f in figs.values()]
    texts += [a["text"] for f in figs.values() for a in f["layout"].get("annotations", [])]
    assert any("<br>" in t for t in texts)
    for text in texts:
        assert all(len(line) <= TITLE_LINE for line in text.split("<br>")), text
    assert wrapped("a b c", 3) == "a b<br>c" and wrapped("one<br>two") == "one<br>two"


def test_an_empty_panel_of_two_says_so_in_that_panel():
    """A script's run has a weight norm but no learning rate: the lower panel of its weight
    figure (effective learning rate, angular update) says it was not recorded; the upper
    panel, drawn, says nothing."""
    view = small_view()
    for stat in ("eff_lr", "angular_update"):
        view["detail"][stat] = (STEPS, np.full(len(STEPS), np.nan))
    figs, _ = run_figures(view)
    (note,) = figs["fig-scale"]["layout"]["annotations"]
    assert note["text"] == "not recorded for this run" and note["yref"] == "y2 domain"
    assert notes(figs["fig-layer"]) == "" and notes(figs["fig-affine"]) == ""


@pytest.mark.parametrize("stat", ["pre_var", "pre_mean"])
def test_compare_figures_name_runs_and_take_the_statistic_s_axis(stat):
    run = {"name": "bn", "status": "completed", "layer": "b", "loss": _xy(), "test_acc": _xy(),
           "stat": _xy()}  # fmt: skip
    figs = compare_figures([run, {**run, "name": "plain"}], stat)
    assert names(figs["cmp-loss"]) == ["bn (completed)", "plain (completed)"]
    assert names(figs["cmp-stat-fig"]) == ["bn (completed) b", "plain (completed) b"]
    axis = figs["cmp-stat-fig"]["layout"]["yaxis"]
    assert axis["type"] == ("log" if STATISTICS[stat].log else "linear")
    assert axis["title"]["text"].startswith(STATISTICS[stat].label)


def every_figure() -> list[dict]:
    """Every figure the dashboard and the report draw: the run view's, compare's, an
    experiment's."""
    run = {"name": "bn", "status": "completed", "layer": "b", "loss": _xy(), "test_acc": _xy(),
           "stat": _xy()}  # fmt: skip
    panel = {"series": [{"name": "measured", "theory": False, "x": [16, 32], "y": [0.1, 0.2]}],
             "log_x": True, "log_y": False, "kind": "by_value", "title": "t", "x_label": "batch",
             "y_label": "gap"}  # fmt: skip
    return [*run_figures(small_view())[0].values(), *compare_figures([run], "pre_var").values(),
            experiment_figure(panel)]  # fmt: skip


def test_every_heatmap_takes_its_colours_from_one_explicit_scale():
    """A named scale ("RdBu") is read the other way round by plotly.py (the report) and
    plotly.js (the dashboard): every heatmap's scale is an explicit list, negative means blue
    and positive red wherever it is drawn, and a share is read against 0 and 1."""
    heats = [t for f in every_figure() for t in f["data"] if t["type"] == "heatmap"]
    assert len(heats) >= 6
    for trace in heats:
        scale = trace["colorscale"]
        assert isinstance(scale, list) and scale[0][0] == 0 and scale[-1][0] == 1, trace["name"]
        assert scale in [[[i / (len(c["colors"]) - 1), x] for i, x in enumerate(c["colors"])]
                         for c in SCALES.values()]  # fmt: skip
        assert "reversescale" not in trace
    figs, _ = run_figures(small_view())
    mean = figs["fig-heat-mean"]["data"][0]
    assert mean["zmid"] == 0
    blue, red = mean["colorscale"][0][1], mean["colorscale"][-1][1]
    assert _rgb(blue)[2] > _rgb(blue)[0] and _rgb(red)[0] > _rgb(red)[2], "negative blue"
    sat = figs["fig-heat-sat"]["data"][0]
    assert (sat["zmin"], sat["zmax"]) == (0, 1), "a share's colours span 0 to 1"


def _rgb(color: str) -> tuple[int, ...]:
    return tuple(int(v) for v in color.removeprefix("rgb(").removesuffix(")").split(","))


def test_hovers_name_the_statistic_and_the_axes():
    """No hover reads "x: 501 y: block2 z: -0.139": each names where (its axes' titles) and
    what (the trace's statistic, a heatmap's colour-bar title with its unit)."""
    for fig in every_figure():
        lay = fig["layout"]
        for trace in fig["data"]:
            hover = trace["hovertemplate"]
            assert "%{y" in hover and "%{x" in hover and hover.endswith("<extra></extra>")
            x_title = lay["xaxis"]["title"]["text"] if trace.get("xaxis", "x") == "x" else ""
            if x_title:
                assert x_title.replace("<br>", " ").replace(" (log)", "") in hover
            if trace["type"] == "heatmap":
                assert f"{trace['colorbar']['title']['text']}: %{{z" in hover
            else:
                assert (trace.get("name") or "") in hover
    figs, _ = run_figures(small_view())
    assert (
        "layer %{y}<br>step %{x}<br><b>mean: %{z"
        in figs["fig-heat-mean"]["data"][0]["hovertemplate"]
    )


def test_a_dotted_line_is_the_earlier_moment_in_every_figure_of_two():
    """Population and signal figures draw the latest evaluation solid and the first dotted."""
    figs, _ = run_figures(small_view())
    for graph in ("fig-population", "fig-signal"):
        for trace in figs[graph]["data"]:
            dotted = trace["line"].get("dash") == EARLIER["dash"]
            assert dotted == trace["name"].endswith("step 10"), (graph, trace["name"])


def test_every_layer_of_a_heatmap_is_labelled():
    view = small_view()
    layers = [f"layer{i}.bn" for i in range(20)]
    view["layers"] = layers
    view["heat"] = {s: np.ones((20, 20)) for s in data.HEAT_STATS}
    figs, _ = run_figures(view)
    axis = figs["fig-heat-var"]["layout"]["yaxis"]
    assert axis["type"] == "category" and axis["dtick"] == 1


def test_every_run_figure_has_a_caption_from_the_registry():
    """What to look for, one line each, from bncore.statistics.LOOK_FOR, linking to where the
    statistic is documented."""
    assert set(ABOUT) == set(GRAPHS)
    for graph in GRAPHS:
        doc = about(graph)
        assert doc.look_for and len(doc.look_for) < 160, graph
        assert doc.look_for == statistics.LOOK_FOR[ABOUT[graph]]
    assert set(statistics.LOOK_FOR) <= {n for d in statistics.documented() for n in d.names}


def test_every_figure_is_as_tall_as_its_cell():
    """A figure plotly draws before its cell has a size (a loaded machine) keeps its own
    height: it is at least the cell's, as the stylesheet gives it, or its axis titles run off
    a shorter plot."""
    import re as _re
    from pathlib import Path

    from dashboard.figures.factory import HEIGHT, TALL_HEIGHT
    from dashboard.views.common import TALL

    css = (Path(__file__).parents[2] / "dashboard" / "assets" / "style.css").read_text()
    assert (
        f".graph {{ border: 1px solid #e2e8f0; border-radius: 4px; min-height: {HEIGHT}px; }}"
        in css
    )
    assert _re.search(rf"\.graph\.tall[^{{]*{{ min-height: {TALL_HEIGHT}px; }}", css)
    figs, _ = run_figures(small_view())
    for graph, fig in figs.items():
        assert fig["layout"]["height"] >= (TALL_HEIGHT if graph in TALL else HEIGHT), graph


def test_the_plotly_bundle_registers_the_traces_the_factory_draws():
    """The bundle's registration is cut to :data:`plotlyjs.TRACES` (its other modules never
    run): the module it keeps is the heatmap's, read from the bundle itself, and every trace
    type the factory builds is one of them (scatter is plotly's core)."""
    import re

    from dashboard import plotlyjs
    from dashboard.figures.factory import heatmap, line

    bundle = plotlyjs.FILE.read_text(encoding="utf-8")

    def module_name(entry: str) -> str:
        """The name a registered entry (``xJ()``) exports: ``var xJ=z(...exports=gJ()})``,
        then ``gJ``'s ``moduleType:"trace",name:"heatmap"``."""
        outer = re.search(rf'var {re.escape(entry[:-2])}=z\(\(\w+,\w+\)=>{{"use strict";'
                          rf"\w+\.exports=(\w+)\(\)}}\)", bundle)  # fmt: skip
        assert outer, entry
        start = bundle.index(f"var {outer[1]}=z(")
        return re.search(r'moduleType:"\w+",name:"(\w+)"', bundle[start : start + 20_000])[1]

    kept = re.fullmatch(r"register\(\[(.*)\]\)", plotlyjs.DRAWN)[1].split(",")
    assert {module_name(e) for e in kept} == set(plotlyjs.TRACES) - {"scatter"}
    served = plotlyjs.source()
    assert plotlyjs.DRAWN in served and plotlyjs.REGISTERED not in served
    drawn = {line([0, 1], [1, 2], "a")["type"], heatmap(np.ones((1, 1)), ["a"])["type"]}
    assert drawn <= set(plotlyjs.TRACES)

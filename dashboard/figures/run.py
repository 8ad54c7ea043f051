"""The run view's figures, each declared once (dashboard.figures.declare): what it draws, from
which statistics, and so how it grows live. :func:`run_figures` draws them all from a view."""

from __future__ import annotations

from typing import Any

import numpy as np

from bncore.statistics import REPLICA, STATISTICS, Documented, documented
from bncore.status import FINISHED
from dashboard.figures.declare import (
    DOTTED,
    MARKED,
    Declared,
    Drawing,
    Drawn,
    Heat,
    Latest,
    Line,
    Lines,
    Spec,
    View,
)
from dashboard.figures.factory import (
    AXIS,
    COLORS,
    EARLIER,
    MARGIN,
    TALL_HEIGHT,
    Figure,
    figure,
    has_data,
    heatmap,
    line,
    log10,
    mark_empty,
    tint,
    top_margin,
    wrapped,
)

_LOG = {"type": "log"}
_TWO_PANELS: dict[str, Any] = {"height": TALL_HEIGHT, "rows": 2}

LOSS = Lines(
    "fig-loss", "Loss", "step", "cross-entropy loss (log)",
    (Line("loss", 0), Line("train_loss", 2, style=MARKED), Line("test_loss", 1, style=MARKED)),
    layout={"yaxis": _LOG},
)  # fmt: skip
ACC = Lines(
    "fig-acc", "Accuracy (eval mode) and train/eval gap", "step", "accuracy (share of examples)",
    (
        Line("train_acc", 2, style=MARKED),
        Line("test_acc", 1, style=MARKED),
        Line("mode_gap", 4, lower=True, style=MARKED),
        Line("test_acc_precise", 3, style={**DOTTED, **MARKED}),
        Line("test_acc_batch", 5, style={**DOTTED, **MARKED}),
    ),
    layout={
        "yaxis": {"range": [0, 1.02]},
        "yaxis2": {**AXIS, "overlaying": "y", "side": "right", "showgrid": False, "type": "log",
                   "title": {"text": "mode gap: relative L2 of logits (log)"}},
        "margin": {"r": 70},
    },
)  # fmt: skip
HEATS = (
    Heat("fig-heat-mean", "pre_mean", "Pre-BN batch mean (channel average)", "signed", "mean"),
    Heat("fig-heat-var", "pre_var", "Pre-BN batch variance (log10)", "magnitude",
         "log10 variance"),
    Heat("fig-heat-grad", "grad_in_norm", "Gradient entering each layer (log10 norm)",
         "gradient", "log10 L2 norm"),
    Heat("fig-heat-sat", "act_saturated", "Activations at rest or saturated (share)", "share",
         "share"),
)  # fmt: skip
DEPTH = Latest(
    "fig-depth", "Activation gradient through depth (latest step)", "layer (input side first)",
    "L2 norm of the gradient (log)",
    (Line("grad_out_norm", 3, style=MARKED), Line("grad_in_norm", 0, style=MARKED)),
    layout={"yaxis": _LOG},
)  # fmt: skip
LAYER = Lines(
    "fig-layer", "{layer}: batch against running statistics (channel averages)", "step", "mean",
    (
        Line("pre_mean", 0),
        Line("running_mean", 1, style=DOTTED),
        Line("pre_var", 2, lower=True),
        Line("running_var", 3, lower=True, style=DOTTED),
    ),
    of_layer=True,
    layout={**_TWO_PANELS, "yaxis2": {"title": {"text": "variance"}}},
)  # fmt: skip
AFFINE = Lines(
    "fig-affine", "{layer}: running-statistics gap; gamma and beta (channel averages)", "step",
    "RMS gap<br>running - batch",  # two lines: one ran out of its panel
    (
        Line("running_mean_gap", 0),
        Line("running_var_gap", 1),
        Line("gamma", 2, lower=True),
        Line("beta", 3, lower=True),
    ),
    of_layer=True,
    layout={**_TWO_PANELS, "yaxis2": {"title": {"text": "gamma, beta"}}},
)  # fmt: skip
SCALE = Lines(
    "fig-scale", "{layer}: its weight's norm, effective learning rate and angular update", "step",
    "weight norm (log)",
    (Line("weight_norm", 0), Line("eff_lr", 1, lower=True), Line("angular_update", 2, lower=True)),
    of_layer=True,
    layout={**_TWO_PANELS, "yaxis": _LOG,
            "yaxis2": {"type": "log", "title": {"text": "lr/||w||^2,<br>radians (log)"}}},
)  # fmt: skip


def replica_lines(view: View) -> list[Line]:
    """The global batch, each replica's own (as many as the run has), and their spread."""
    d = view["detail"]
    replicas = sorted(int(m[1]) for k in d if (m := REPLICA.fullmatch(k)) and m[2] == "var")
    return [
        Line("global_pre_var", 0, "global batch", style={"line": {"width": 2.5}}),
        *[Line(f"r{k}_pre_var", k + 1, f"replica {k}") for k in replicas],
        Line("replica_mean_spread", 3, lower=True),
        Line("replica_var_spread", 4, lower=True),
    ]


REPLICAS = Lines(
    "fig-replicas", "{layer}: each replica's batch against the global batch (distributed runs)",
    "step", "batch variance", replica_lines, of_layer=True,
    layout={**_TWO_PANELS, "yaxis2": {"type": "log", "title": {"text": "spread (log)"}}},
)  # fmt: skip
GRADS = Lines(
    "fig-grads", "{layer}: gradient norms, and the norm of the weight feeding BN", "step",
    "L2 norm (log)",
    tuple(Line(s, i) for i, s in enumerate(("weight_grad_norm", "gamma_grad_norm",
                                            "beta_grad_norm", "weight_norm"))),
    of_layer=True,
    layout={"yaxis": _LOG},
)  # fmt: skip


def percentile_lines(view: View) -> list[Line]:
    """Per tracked unit: its 15-85% band and its median; one unit shown (as in the paper), the
    others a legend click away."""
    units = sorted({int(k.split("_")[1]) for k in view["detail"] if k.startswith("p50_")})
    lines = []
    for j in units:
        fill = tint(COLORS[j % len(COLORS)])
        seen = {"legendgroup": f"u{j}", "visible": True if j == 0 else "legendonly"}
        thin = {"line": {"width": 0.5}, **seen}
        lines += [
            Line(f"p15_{j}", j, f"unit {j} 15%", style={"showlegend": False, **thin}),
            Line(f"p85_{j}", j, f"unit {j}: 15-85% of the batch",
                 style={"fill": "tonexty", "fillcolor": fill, **thin}),
            Line(f"p50_{j}", j, f"unit {j}: median", style={"line": {"width": 2}, **seen}),
        ]  # fmt: skip
    return lines


PERCENTILES = Lines(
    "fig-pct", "{layer}: a unit's input to the activation (Ioffe & Szegedy, Fig. 1)", "step",
    "value<br>(15th, 50th, 85th pct)", percentile_lines, of_layer=True,
    layout={"height": TALL_HEIGHT},  # its legend is long
)  # fmt: skip


def first_and_latest(by_block: dict[str, Any], label: str, color: str, names: Any = None) -> list:
    """A per-block statistic at the latest evaluation (solid) and, if it differs, the first
    (dotted, :data:`EARLIER`): every figure of two moments draws them alike."""
    x = by_block["layers"] if names is None else names
    traces = [line(x, by_block["last"], f"{label}, step {by_block['last_step']}", color,
                   **MARKED)]  # fmt: skip
    if by_block["first_step"] != by_block["last_step"]:
        traces.append(line(x, by_block["first"], f"{label}, step {by_block['first_step']}",
                           color, line=EARLIER, **MARKED))  # fmt: skip
    return traces


def population(view: View) -> Drawn:
    """The EMA running statistics' gap to PreciseBN's population statistics, per block, at the
    latest evaluation and the first (measured at evaluations: nothing live)."""
    by_block = view["by_block"]
    fig = figure(
        [*first_and_latest(by_block["ema_mean_gap"], "mean gap", COLORS[0]),
         *first_and_latest(by_block["ema_var_gap"], "variance gap", COLORS[1])],
        "EMA running statistics against PreciseBN's population statistics",
        "layer (input side first)",
        "RMS gap over channels (log)",
        yaxis=_LOG,
    )  # fmt: skip
    return fig, []


def signal(view: View) -> Drawn:
    """Signal propagation through a residual network (Brock et al. 2021), per block, at the
    latest evaluation and the first (nothing live)."""
    traces = []
    for i, stat in enumerate(("signal_var", "signal_sq_mean", "branch_var")):
        v = view["by_block"][stat]
        names = [n.removesuffix(".b") for n in v["layers"]]
        traces += first_and_latest(v, STATISTICS[stat].label, COLORS[i], names)
    fig = figure(
        traces,
        "Signal propagation through the residual blocks (Brock et al. 2021)",
        "residual block (input side first)",
        "value over channels (log)",
        yaxis=_LOG,
    )
    return fig, []


def channels(view: View) -> Drawn:
    """The per-channel heatmaps, rebuilt live from each batch's latest arrays."""
    spec = {"graph": "fig-channels", "kind": "channels", "table": "channels",
            "title": channel_title(None)}  # fmt: skip
    return channel_figure(view["channels"], view["layers"]), [spec]


def channel_figure(rows: list[dict[str, Any]], layers: list[str]) -> Figure:
    """Layer x channel heatmaps of the latest per-channel batch means and variances: one row
    per layer of the run, empty until its first per-channel record (filled live)."""
    names = list(dict.fromkeys([*layers, *(r["layer"] for r in rows)]))
    step = max((r["step"] for r in rows), default=None)
    return figure(
        [
            heatmap(_channel_grid(rows, names, "pre_mean"), names, None, "signed", "batch mean",
                    colorbar={"y": 0.78, "len": 0.45}),
            heatmap(log10(_channel_grid(rows, names, "pre_var")), names, None, "magnitude",
                    "log10 variance", xaxis="x2", yaxis="y2", colorbar={"y": 0.22, "len": 0.45}),
        ],
        channel_title(step),
        "channel",
        "layer",
        height=max(TALL_HEIGHT, 120 + 36 * len(names)),
        # one channel axis, below both panels (on top, its title sat on the figure's); each
        # panel's y title short enough for its panel, its colour bar saying which it is
        yaxis={"domain": [0.56, 1.0]},
        xaxis={"anchor": "y", "visible": False},
        margin={"t": top_margin(channel_title(0).count("<br>") + 1)},  # a step line to come
        xaxis2={**AXIS, "title": {"text": "channel"}, "anchor": "y2", "matches": "x"},
        yaxis2={**AXIS, "domain": [0.0, 0.44], "title": {"text": "layer"}, "anchor": "x2",
                "type": "category"},
    )  # fmt: skip


def _channel_grid(rows: list[dict[str, Any]], names: list[str], col: str) -> np.ndarray:
    """Layers x channels of one per-channel column; NaN past a narrower layer's channels and
    for a layer with no arrays yet."""
    by_layer = {r["layer"]: r for r in rows}
    width = max((len(r["pre_mean"]) for r in rows), default=0)
    z = np.full((len(names), width), np.nan)
    for i, name in enumerate(names):
        if name in by_layer:
            z[i, : len(by_layer[name][col])] = by_layer[name][col]
    return z


def channel_title(step: int | None) -> str:
    """The per-channel figure's title (assets/live.js writes the same as the step moves)."""
    where = f"<br>step {step}" if step is not None else ""
    return f"{wrapped('Per-channel batch mean (top) and log10 variance (bottom)')}{where}"


#: Every figure of the run view.
RUN_FIGURES: tuple[Declared, ...] = (
    LOSS, ACC, Drawing("fig-population", population), Drawing("fig-signal", signal), *HEATS,
    DEPTH, LAYER, AFFINE, SCALE, REPLICAS, GRADS, PERCENTILES, Drawing("fig-channels", channels),
)  # fmt: skip
#: What each figure of the run view is about: it is captioned with that statistic's line of
#: bncore.statistics.LOOK_FOR, linked to its documentation.
ABOUT = {
    "fig-loss": "loss", "fig-acc": "mode_gap", "fig-heat-var": "pre_var",
    "fig-heat-mean": "pre_mean", "fig-depth": "grad_out_norm", "fig-depth-2": "grad_out_norm",
    "fig-channels": "pre_var_min", "fig-layer": "running_mean", "fig-affine": "running_var_gap",
    "fig-grads": "weight_grad_norm", "fig-scale": "eff_lr", "fig-replicas": "replica_var_spread",
    "fig-pct": "p50_j", "fig-heat-grad": "grad_in_norm", "fig-heat-sat": "act_saturated",
    "fig-population": "ema_mean_gap", "fig-signal": "signal_var",
}  # fmt: skip


def about(graph: str) -> Documented:
    """The documented statistic a run figure is about (its caption and link)."""
    return next(d for d in documented() if ABOUT[graph] in d.names)


#: Figures shown in a second section too: the same drawing, fed alike.
ALSO = {"fig-depth-2": "fig-depth"}
#: Which of a run's "not recorded" notes (bncore.record.watcher) explains an empty figure.
NOTE_FOR = {"fig-heat-sat": "act", "fig-grads": "weight"}
#: Why a figure of per-block evaluations can be empty: what the run did not ask for.
NEEDS = {
    "fig-population": "set precise_bn to recompute population statistics at each evaluation",
    "fig-signal": "measured for residual networks (model.kind=resnet)",
    "fig-replicas": "set distributed.replicas above 1 to train over several processes",
}


def run_figures(view: View) -> tuple[dict[str, Figure], list[Spec]]:
    """The run view's figures by graph id, and their live specs."""
    figs: dict[str, Figure] = {}
    specs: list[Spec] = []
    for declared in RUN_FIGURES:
        drawn = declared.draw(view)
        if drawn is not None:
            figs[declared.graph], live = drawn
            specs += live
    for graph, shown in ALSO.items():
        if shown in figs:
            figs[graph] = figs[shown]
            specs += [{**s, "graph": graph} for s in specs if s["graph"] == shown]
    if view["last_step"]:  # records came, but none for these: say so instead of empty axes
        run = view["run"]
        not_recorded = (run.get("meta") or {}).get("not_recorded") or {}
        ended = run.get("status") in FINISHED
        explain_empty(figs, not_recorded, script=run.get("source") == "client", ended=ended)
    return figs, specs


#: Why a script's run has no figure of :data:`NEEDS`: the script has no config to set.
SCRIPT_NEEDS = "measured in the runs BN Scope trains itself (Launch, bnscope train)"


def explain_empty(
    figs: dict[str, Figure], not_recorded: dict[str, str], script: bool, ended: bool = True
) -> None:
    """Each figure with nothing to draw says why: the run's own note, or what it needs (a
    script's run: that BN Scope's own runs measure it); while the run goes on, that nothing is
    recorded yet (its first evaluation may be to come); a figure of two panels with one of them
    empty says so in that panel; an empty right axis is hidden where nothing is to come."""
    said = "not recorded for this run" if ended else "nothing recorded yet"
    for graph, fig in figs.items():
        if not has_data(fig):
            needs = (SCRIPT_NEEDS if script else NEEDS[graph]) if graph in NEEDS else ""
            reason = not_recorded.get(NOTE_FOR.get(graph, ""), "") or needs
            mark_empty(fig, said + (f": {reason}" if reason else ""))
        elif "domain" in fig["layout"].get("yaxis2", {}):
            for panel in ("y", "y2"):
                if not has_data(fig, panel):
                    mark_empty(fig, "not recorded for this run", panel)
        elif (
            (ended or not script)
            and "overlaying" in fig["layout"].get("yaxis2", {})
            and not has_data(fig, "y2", positive=fig["layout"]["yaxis2"].get("type") == "log")
        ):
            # a right axis with nothing it can draw (a run without BN: its mode gap is 0, which
            # a log axis cannot show; or none at all): not one with the ticks of a range plotly
            # made up, nor its name in the legend. BN Scope's own runs evaluate the mode gap
            # with the accuracies, so one that has accuracies and no gap has none to come; a
            # script may log its evaluations and its probe apart.
            fig["layout"]["yaxis2"]["visible"] = False
            fig["layout"]["margin"]["r"] = MARGIN["r"]
            for trace in fig["data"]:
                if trace.get("yaxis") == "y2":
                    trace["showlegend"] = False

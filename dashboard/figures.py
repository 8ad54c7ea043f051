"""Figures from the data of dashboard.data, and how each one grows with a live batch.

Every figure of the run view comes with a *live spec*: which records table feeds it and how
(``line``: extend trace i with column i; ``heat``: append a step column of a layer x step
heatmap; ``latest``: replace the values with the batch's last ones). assets/live.js follows the
specs; nothing about a figure's layout is written twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bncore.statistics import REPLICA, STATISTICS

Figure = dict[str, Any]  # plotly's JSON figure: plain dicts are far cheaper than Figure

MAX_LIVE_POINTS = 5_000  # per line trace while a run streams
MAX_LIVE_COLUMNS = 1_000  # per heatmap while a run streams
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
          "#e377c2", "#7f7f7f", "#bcbd22")  # fmt: skip
_AXIS = {"gridcolor": "#eef2f7", "zeroline": False, "automargin": True}
#: Per-layer statistics a user can pick to compare runs by (bncore.statistics).
STAT_LABELS = {s.name: s.label for s in STATISTICS.values() if s.compare}


def figure(
    traces: list[dict[str, Any]],
    title: str,
    x_title: str,
    y_title: str,
    height: int = 300,
    rows: int = 1,
    **layout: Any,
) -> Figure:
    """A figure whose axes say what they show (``x_title``, ``y_title``, with units); with
    rows=2, traces carrying yaxis 'y2' go to a lower panel sharing x (name it in ``yaxis2``).
    Log axes get few, readable tick labels (powers of ten)."""
    lay: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 14}, "x": 0.01},
        "margin": {"l": 60, "r": 16, "t": 36, "b": 40},
        "height": height,
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "uirevision": "keep",
        # below the x axis's title, at the bottom of the figure, whatever its height
        "legend": {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
        "xaxis": {**_AXIS, "title": {"text": x_title}},
        "yaxis": {**_AXIS, "title": {"text": y_title}},
    }
    if rows == 2:
        lay["yaxis"]["domain"] = [0.55, 1.0]
        lay["yaxis2"] = {**_AXIS, "domain": [0.0, 0.45], "anchor": "x"}
        lay["xaxis"]["anchor"] = "y2"
    for trace in traces:  # layer names ("1", "4", "layer1.0.bn1") are names, never numbers
        for axis in ("x", "y"):
            values = trace.get(axis)
            if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
                key = trace.get(f"{axis}axis", axis).replace(axis, f"{axis}axis", 1)
                lay.setdefault(key, dict(_AXIS))["type"] = "category"
    for key, value in layout.items():
        if isinstance(value, dict) and isinstance(lay.get(key), dict):
            lay[key] = {**lay[key], **value}
        else:
            lay[key] = value
    for key, axis in lay.items():
        if key[1:5] == "axis" and isinstance(axis, dict) and axis.get("type") == "log":
            axis.setdefault("nticks", 6)  # a few labels, not every digit of every decade
            axis.setdefault("exponentformat", "power")
    shown = [t for t in traces if t.get("showlegend", True) is not False and t.get("name")]
    if shown and lay.get("showlegend", True) and not all(t["type"] == "heatmap" for t in shown):
        lay["margin"]["b"] = 52 + 20 * min(5, 1 + len(shown) // 3)  # room for the legend
    return {"data": traces, "layout": lay}


def line(x: Any, y: Any, name: str, color: str | None = None, **kw: Any) -> dict[str, Any]:
    style: dict[str, Any] = {
        "type": "scatter",
        "mode": "lines",
        "line": {"color": color, "width": 1.5},
        "connectgaps": True,  # statistics recorded every k steps still draw as lines
    }
    style["line"].update(kw.pop("line", {}))
    return {**style, "x": plain(x), "y": plain(np.asarray(y, dtype=float)), "name": name, **kw}


def trace(xy: tuple[Any, Any], name: str, color: str | None = None, **kw: Any) -> dict[str, Any]:
    """:func:`line` of a (steps, values) pair."""
    return line(xy[0], xy[1], name, color, **kw)


def heatmap(z: np.ndarray, y: list[str], x: Any = None, **kw: Any) -> dict[str, Any]:
    trace = {"type": "heatmap", "z": plain(z), "y": list(y), "colorbar": {"thickness": 10}, **kw}
    if x is not None:
        trace["x"] = plain(x)
    return trace


def plain(a: Any) -> list[Any]:
    """Lists, not numpy arrays: plotly sends arrays as typed binary blocks, which the browser
    cannot extend in place (extendData). NaN becomes None (a gap)."""
    arr = np.asarray(a)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        arr = arr.round(6).astype(object)
        arr[~finite] = None
    out: list[Any] = arr.tolist()
    return out


def _tint(color: str, alpha: float = 0.18) -> str:
    """A see-through fill of a #rrggbb colour, so that overlapping bands stay apart."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _log10(a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, np.log10(a), np.nan)


def run_figures(view: dict[str, Any]) -> tuple[dict[str, Figure], list[dict[str, Any]]]:
    """The run view's figures by graph id, and their live specs."""
    layers, layer, ev = view["layers"], view["layer"], view["evals"]
    figs: dict[str, Figure] = {}
    specs: list[dict[str, Any]] = []

    def live(graph: str, table: str, columns: list[str], traces: list[int], **kw: Any) -> None:
        specs.append(
            {
                "graph": graph,
                "kind": "line",
                "table": table,
                "columns": columns,
                "traces": traces,
                "max": MAX_LIVE_POINTS,
                **kw,
            }
        )

    marked: dict[str, Any] = {"mode": "lines+markers"}
    figs["fig-loss"] = figure(
        [
            trace(view["lines"]["loss"], "train loss (batch)", COLORS[0]),
            trace(ev["train_loss"], "train loss (eval)", COLORS[2], **marked),
            trace(ev["test_loss"], "test loss (eval)", COLORS[1], **marked),
        ],
        "Loss",
        "step",
        "cross-entropy loss (log)",
        yaxis={"type": "log"},
    )
    live("fig-loss", "steps", ["loss"], [0])
    live("fig-loss", "evals", ["train_loss", "test_loss"], [1, 2])
    figs["fig-acc"] = figure(
        [
            trace(ev["train_acc"], "train accuracy", COLORS[2], **marked),
            trace(ev["test_acc"], "test accuracy", COLORS[1], **marked),
            trace(ev["mode_gap"], "train-vs-eval mode gap", COLORS[4], yaxis="y2", **marked),
            trace(ev["test_acc_precise"], "test accuracy, PreciseBN statistics", COLORS[3],
                  line={"dash": "dot"}, **marked),
            trace(ev["test_acc_batch"], "test accuracy, batch statistics", COLORS[5],
                  line={"dash": "dot"}, **marked),
        ],
        "Accuracy (eval mode) and train/eval gap",
        "step",
        "accuracy (share of examples)",
        yaxis={"range": [0, 1.02]},
        yaxis2={**_AXIS, "overlaying": "y", "side": "right", "showgrid": False, "type": "log",
                "title": {"text": "mode gap: relative L2 of logits (log)"}},
        margin={"r": 70},
    )  # fmt: skip
    live("fig-acc", "evals", ["train_acc", "test_acc", "mode_gap", "test_acc_precise",
                              "test_acc_batch"], [0, 1, 2, 3, 4])  # fmt: skip
    figs.update(block_figures(view["by_block"]))

    for gid, stat, title, log, scale, unit in (
        ("fig-heat-mean", "pre_mean", "Pre-BN batch mean (channel average)", False, "RdBu",
         "mean"),
        ("fig-heat-var", "pre_var", "Pre-BN batch variance (log10)", True, "Viridis",
         "log10 variance"),
        ("fig-heat-grad", "grad_in_norm", "Gradient entering each layer (log10 norm)", True,
         "Hot", "log10 L2 norm"),
        ("fig-heat-sat", "act_saturated", "Activations at rest or saturated (share)", False,
         "Greys", "share"),
    ):  # fmt: skip
        z = _log10(view["heat"][stat]) if log else view["heat"][stat]
        extra = {"zmid": 0, "reversescale": True} if scale == "RdBu" else {}
        figs[gid] = figure(
            [heatmap(z, layers, view["heat_steps"], transpose=True, colorscale=scale,
                     colorbar={"thickness": 10, "title": {"text": unit, "side": "right"}},
                     name=unit, **extra)],
            title,
            "step",
            "layer",
            height=max(240, 80 + 18 * len(layers)),
        )  # fmt: skip
        specs.append(
            {
                "graph": gid,
                "kind": "heat",
                "table": "layers",
                "column": stat,
                "log": log,
                "layers": layers,
                "max": MAX_LIVE_COLUMNS,
            }
        )

    depth = view["depth"]
    figs["fig-depth"] = figs["fig-depth-2"] = figure(
        [
            line(layers, depth["grad_out_norm"], "reaching BN's output", COLORS[3], **marked),
            line(layers, depth["grad_in_norm"], "leaving through BN's input", COLORS[0], **marked),
        ],
        "Activation gradient through depth (latest step)",
        "layer (input side first)",
        "L2 norm of the gradient (log)",
        yaxis={"type": "log"},
    )
    specs.append(
        {
            "graph": "fig-depth",
            "kind": "latest",
            "table": "layers",
            "columns": ["grad_out_norm", "grad_in_norm"],
            "layers": layers,
        }
    )
    specs.append({**specs[-1], "graph": "fig-depth-2"})

    d = view["detail"]
    if layer:
        low = {"yaxis": "y2"}
        figs["fig-layer"] = figure(
            [
                trace(d["pre_mean"], "batch mean", COLORS[0]),
                trace(d["running_mean"], "running mean", COLORS[1], line={"dash": "dot"}),
                trace(d["pre_var"], "batch variance", COLORS[2], **low),
                trace(d["running_var"], "running variance", COLORS[3], line={"dash": "dot"},
                      **low),
            ],
            f"{layer}: batch against running statistics (channel averages)",
            "step",
            "mean",
            height=400,
            rows=2,
            yaxis2={"title": {"text": "variance"}},
        )  # fmt: skip
        figs["fig-affine"] = figure(
            [
                trace(d["running_mean_gap"], "running-mean gap (RMS)", COLORS[0]),
                trace(d["running_var_gap"], "running-variance gap (RMS)", COLORS[1]),
                trace(d["gamma"], "gamma", COLORS[2], **low),
                trace(d["beta"], "beta", COLORS[3], **low),
            ],
            f"{layer}: running-statistics gap; gamma and beta (channel averages)",
            "step",
            "RMS gap (running - batch)",
            height=400,
            rows=2,
            yaxis2={"title": {"text": "gamma, beta"}},
        )
        figs["fig-scale"] = figure(
            [
                trace(d["weight_norm"], "weight norm ||w||", COLORS[0]),
                trace(d["eff_lr"], "effective learning rate lr/||w||^2", COLORS[1], **low),
                trace(d["angular_update"], "angular update (rad)", COLORS[2], **low),
            ],
            f"{layer}: its weight's norm, effective learning rate and angular update",
            "step",
            "weight norm (log)",
            height=400,
            rows=2,
            yaxis={"type": "log"},
            yaxis2={"type": "log", "title": {"text": "lr/||w||^2, radians (log)"}},
        )
        replicas = sorted(int(m[1]) for k in d if (m := REPLICA.fullmatch(k)) and m[2] == "var")
        rep_cols = ["global_pre_var", *[f"r{k}_pre_var" for k in replicas],
                    "replica_mean_spread", "replica_var_spread"]  # fmt: skip
        empty: tuple[list[int], list[float]] = ([], [])
        figs["fig-replicas"] = figure(
            [
                trace(d.get("global_pre_var", empty), "global batch", COLORS[0],
                      line={"width": 2.5}),
                *[trace(d[f"r{k}_pre_var"], f"replica {k}", COLORS[(k + 1) % len(COLORS)])
                  for k in replicas],
                trace(d.get("replica_mean_spread", empty), "replicas' means around the global "
                      "(RMS, in std)", COLORS[3], **low),
                trace(d.get("replica_var_spread", empty), "replicas' variances around the "
                      "global (RMS, relative)", COLORS[4], **low),
            ],
            f"{layer}: each replica's batch against the global batch (distributed runs)",
            "step",
            "batch variance",
            height=400,
            rows=2,
            yaxis2={"type": "log", "title": {"text": "spread (log)"}},
        )  # fmt: skip
        figs["fig-grads"] = figure(
            [
                trace(d[s], s.replace("_", " "), COLORS[i])
                for i, s in enumerate(
                    ("weight_grad_norm", "gamma_grad_norm", "beta_grad_norm", "weight_norm")
                )
            ],
            f"{layer}: gradient norms, and the norm of the weight feeding BN",
            "step",
            "L2 norm (log)",
            yaxis={"type": "log"},
        )
        units = sorted({int(k.split("_")[1]) for k in d if k.startswith("p50_")})
        traces = []
        for j in units:  # one unit shown (as in the paper); the others a legend click away
            c = COLORS[j % len(COLORS)]
            seen: dict[str, Any] = {
                "legendgroup": f"u{j}",
                "visible": True if j == 0 else "legendonly",
            }
            traces += [
                trace(d[f"p15_{j}"], f"unit {j} 15%", c, showlegend=False, line={"width": 0.5},
                      **seen),
                trace(d[f"p85_{j}"], f"unit {j}: 15-85% of the batch", c, fill="tonexty",
                      fillcolor=_tint(c), line={"width": 0.5}, **seen),
                trace(d[f"p50_{j}"], f"unit {j}: median", c, line={"width": 2}, **seen),
            ]  # fmt: skip
        figs["fig-pct"] = figure(
            traces,
            f"{layer}: a unit's input to the activation (Ioffe & Szegedy, Fig. 1)",
            "step",
            "value (15th, 50th, 85th pct)",
        )
        for gid, cols in (
            ("fig-layer", ["pre_mean", "running_mean", "pre_var", "running_var"]),
            ("fig-affine", ["running_mean_gap", "running_var_gap", "gamma", "beta"]),
            ("fig-grads", ["weight_grad_norm", "gamma_grad_norm", "beta_grad_norm", "weight_norm"]),
            ("fig-pct", [f"p{q}_{j}" for j in units for q in (15, 85, 50)]),
            ("fig-scale", ["weight_norm", "eff_lr", "angular_update"]),
            ("fig-replicas", rep_cols),
        ):
            live(gid, "layers", cols, list(range(len(cols))), layer=layer)

    figs["fig-channels"] = channel_figure(view["channels"], layers)
    specs.append(
        {"graph": "fig-channels", "kind": "channels", "table": "channels",
         "title": channel_title(None)}
    )  # fmt: skip
    if view["last_step"]:  # records came, but none for these: say so instead of empty axes
        notes = (view["run"].get("meta") or {}).get("not_recorded") or {}
        for gid, fig in figs.items():
            if not _has_data(fig):
                reason = notes.get(_NOTE_FOR.get(gid, ""), "") or _NEEDS.get(gid, "")
                mark_empty(fig, "not recorded for this run" + (f": {reason}" if reason else ""))
    return figs, specs


#: Which of a run's "not recorded" notes (bncore.record.watcher) explains an empty figure.
_NOTE_FOR = {"fig-heat-sat": "act", "fig-grads": "weight"}
#: Why a figure of per-block evaluations can be empty: what the run did not ask for.
_NEEDS = {
    "fig-population": "set precise_bn to recompute population statistics at each evaluation",
    "fig-signal": "measured for residual networks (model.kind=resnet)",
    "fig-replicas": "set distributed.replicas above 1 to train over several processes",
}


def block_figures(by_block: dict[str, Any]) -> dict[str, Figure]:
    """Per-block values measured at evaluations: the EMA statistics' gap to the population's
    (PreciseBN), and signal propagation through a residual network (Brock et al. 2021), at the
    first evaluation and the latest."""
    figs = {}
    gap_m, gap_v = by_block["ema_mean_gap"], by_block["ema_var_gap"]
    figs["fig-population"] = figure(
        [
            line(gap_m["layers"], gap_m["last"], f"mean gap, step {gap_m['last_step']}",
                 COLORS[0], mode="lines+markers"),
            line(gap_v["layers"], gap_v["last"], f"variance gap, step {gap_v['last_step']}",
                 COLORS[1], mode="lines+markers"),
            line(gap_m["layers"], gap_m["first"], f"mean gap, step {gap_m['first_step']}",
                 COLORS[0], mode="lines+markers", line={"dash": "dot"}),
        ],
        "EMA running statistics against PreciseBN's population statistics",
        "layer (input side first)",
        "RMS gap over channels (log)",
        yaxis={"type": "log"},
    )  # fmt: skip
    traces = []
    for i, (stat, label) in enumerate((("signal_var", "average channel variance"),
                                       ("signal_sq_mean", "average channel squared mean"),
                                       ("branch_var", "residual branch variance"))):  # fmt: skip
        v = by_block[stat]
        names = [n.removesuffix(".b") for n in v["layers"]]
        traces.append(line(names, v["first"], f"{label}, step {v['first_step']}", COLORS[i],
                           mode="lines+markers"))  # fmt: skip
        if v["last_step"] != v["first_step"]:
            traces.append(line(names, v["last"], f"{label}, step {v['last_step']}", COLORS[i],
                               mode="lines+markers", line={"dash": "dot"}))  # fmt: skip
    figs["fig-signal"] = figure(
        traces,
        "Signal propagation through the residual blocks (Brock et al. 2021)",
        "residual block (input side first)",
        "value over channels (log)",
        yaxis={"type": "log"},
    )
    return figs


def _has_data(fig: Figure) -> bool:
    for trace in fig["data"]:
        for key in ("y", "z"):
            values = np.asarray(trace.get(key) or [], dtype=object).ravel()
            if any(v is not None and v == v for v in values):  # v == v: not NaN
                return True
    return False


def nothing(text: str) -> Figure:
    """An empty figure that says why (no axes to read)."""
    fig = figure([], "", "", "", height=220)
    fig["layout"]["xaxis"]["visible"] = fig["layout"]["yaxis"]["visible"] = False
    mark_empty(fig, text)
    return fig


def mark_empty(fig: Figure, text: str) -> None:
    """An empty figure says why it is empty, in the middle of its plot."""
    fig["layout"]["annotations"] = [
        {"text": text, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
         "showarrow": False, "font": {"size": 13, "color": "#6b7280"}}
    ]  # fmt: skip


def channel_figure(rows: list[dict[str, Any]], layers: list[str]) -> Figure:
    """Layer x channel heatmaps of the latest per-channel batch means and variances: one row
    per layer of the run, empty until its first per-channel record (filled live)."""
    names = list(dict.fromkeys([*layers, *(r["layer"] for r in rows)]))
    by_layer = {r["layer"]: r for r in rows}
    width = max((len(r["pre_mean"]) for r in rows), default=0)

    def grid(col: str, log: bool) -> np.ndarray:
        z = np.full((len(names), width), np.nan)
        for i, name in enumerate(names):
            if name in by_layer:
                z[i, : len(by_layer[name][col])] = by_layer[name][col]
        return _log10(z) if log else z

    step = max((r["step"] for r in rows), default=None)
    return figure(
        [
            heatmap(
                grid("pre_mean", False),
                names,
                colorscale="RdBu",
                reversescale=True,
                zmid=0,
                colorbar={"thickness": 10, "y": 0.78, "len": 0.45,
                          "title": {"text": "mean", "side": "right"}},
                name="batch mean",
            ),
            heatmap(
                grid("pre_var", True),
                names,
                colorscale="Viridis",
                xaxis="x2",
                yaxis="y2",
                colorbar={"thickness": 10, "y": 0.22, "len": 0.45,
                          "title": {"text": "log10 var", "side": "right"}},
                name="batch variance (log10)",
            ),
        ],
        channel_title(step),
        "channel",
        "layer: batch mean",
        height=max(320, 120 + 36 * len(names)),
        yaxis={"domain": [0.56, 1.0]},
        xaxis={"anchor": "y", "side": "top"},
        margin={"t": 84},
        xaxis2={**_AXIS, "title": {"text": "channel"}, "anchor": "y2", "matches": "x"},
        yaxis2={**_AXIS, "domain": [0.0, 0.44], "title": {"text": "layer: log10 variance"},
                "anchor": "x2", "type": "category"},
    )  # fmt: skip


def channel_title(step: int | None) -> str:
    """The per-channel figure's title (assets/live.js writes the same as the step moves)."""
    where = f", step {step}" if step is not None else ""
    return f"Per-channel batch mean (top) and log10 variance (bottom){where}"


def compare_figures(runs: list[dict[str, Any]], stat: str) -> dict[str, Figure]:
    """Runs overlaid: loss, test accuracy, and one statistic at one layer position."""
    loss, acc, st = [], [], []
    for i, r in enumerate(runs):
        c, name = COLORS[i % len(COLORS)], f"{r['name']} ({r['status']})"
        loss.append(trace(r["loss"], name, c))
        acc.append(trace(r["test_acc"], name, c, mode="lines+markers"))
        st.append(trace(r["stat"], f"{name} {r['layer']}", c))
    return {
        "cmp-loss": figure(
            loss, "Training loss", "step", "cross-entropy loss (log)", yaxis={"type": "log"}
        ),
        "cmp-acc": figure(acc, "Test accuracy (eval mode)", "step", "accuracy (share of examples)"),
        "cmp-stat-fig": figure(
            st,
            f"{STAT_LABELS.get(stat, stat)} at the chosen layer",
            "step",
            _stat_axis(stat),
            yaxis={"type": "log" if stat in STATISTICS and STATISTICS[stat].log else "linear"},
        ),
    }


def _stat_axis(name: str) -> str:
    """A statistic's axis title: its label, its unit, and (log) where drawn so."""
    stat = STATISTICS.get(name)
    if stat is None:
        return name
    unit = f" ({stat.unit})" if stat.unit else ""
    return stat.label + unit + (" (log)" if stat.log else "")


def experiment_figure(panel: dict[str, Any]) -> Figure:
    """One panel of an experiment's result (bncore.science.experiments.result): measured lines
    solid, theory dashed in the colour of the measurement it belongs to; None is a gap."""
    traces: list[dict[str, Any]] = []
    colors: dict[str, str] = {}
    for s in panel["series"]:
        base = s["name"].split(": ")[0] if s["theory"] else s["name"]
        color = colors.setdefault(base, COLORS[len(colors) % len(COLORS)])
        y = np.array([np.nan if v is None else v for v in s["y"]], dtype=float)
        marked = panel["kind"] in ("by_value", "by_layer")
        kw: dict[str, Any] = {"mode": "lines+markers"} if marked else {}
        if s["theory"]:
            kw["line"] = {"dash": "dash"}
        traces.append(line(s["x"], y, s["name"], color, **kw))
    xaxis: dict[str, Any] = {"type": "log" if panel["log_x"] else "linear"}
    if panel["kind"] == "by_value":  # label every value tried (16, 32, 64 on a log axis)
        values = sorted({v for s in panel["series"] for v in s["x"] if isinstance(v, int | float)})
        if values and len(values) <= 12:
            xaxis.update(tickmode="array", tickvals=values, ticktext=[f"{v:g}" for v in values])
    return figure(
        traces,
        panel["title"],
        panel["x_label"],
        panel["y_label"],
        height=440,
        xaxis=xaxis,
        yaxis={"type": "log" if panel.get("log_y") else "linear"},
    )

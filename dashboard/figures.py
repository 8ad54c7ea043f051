"""Figures from the data of dashboard.data, and how each one grows with a live batch.

Every figure of the run view comes with a *live spec*: which records table feeds it and how
(``line``: extend trace i with column i; ``heat``: append a step column of a layer x step
heatmap; ``latest``: replace the values with the batch's last ones). assets/live.js follows the
specs; nothing about a figure's layout is written twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bncore.statistics import STATISTICS

Figure = dict[str, Any]  # plotly's JSON figure: plain dicts are far cheaper than Figure

MAX_LIVE_POINTS = 5_000  # per line trace while a run streams
MAX_LIVE_COLUMNS = 1_000  # per heatmap while a run streams
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
          "#e377c2", "#7f7f7f", "#bcbd22")  # fmt: skip
_AXIS = {"gridcolor": "#eef2f7", "zeroline": False, "automargin": True}
#: Per-layer statistics a user can pick to compare runs by (bncore.statistics).
STAT_LABELS = {s.name: s.label for s in STATISTICS.values() if s.compare}


def figure(
    traces: list[dict[str, Any]], title: str, height: int = 280, rows: int = 1, **layout: Any
) -> Figure:
    """A figure; with rows=2, traces carrying yaxis 'y2' go to a lower panel sharing x."""
    lay: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 14}, "x": 0.01},
        "margin": {"l": 50, "r": 10, "t": 36, "b": 30},
        "height": height,
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "uirevision": "keep",
        "legend": {"orientation": "h", "y": -0.2},
        "xaxis": dict(_AXIS),
        "yaxis": dict(_AXIS),
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
        yaxis={"type": "log"},
    )
    live("fig-loss", "steps", ["loss"], [0])
    live("fig-loss", "evals", ["train_loss", "test_loss"], [1, 2])
    figs["fig-acc"] = figure(
        [
            trace(ev["train_acc"], "train accuracy", COLORS[2], **marked),
            trace(ev["test_acc"], "test accuracy", COLORS[1], **marked),
            trace(ev["mode_gap"], "train-vs-eval mode gap", COLORS[4], yaxis="y2", **marked),
        ],
        "Accuracy (eval mode) and train/eval gap",
        yaxis2={**_AXIS, "overlaying": "y", "side": "right", "showgrid": False, "title": "gap"},
    )
    live("fig-acc", "evals", ["train_acc", "test_acc", "mode_gap"], [0, 1, 2])

    for gid, stat, title, log, scale in (
        ("fig-heat-mean", "pre_mean", "Pre-BN batch mean (channel average)", False, "RdBu"),
        ("fig-heat-var", "pre_var", "Pre-BN batch variance (log10)", True, "Viridis"),
        ("fig-heat-grad", "grad_in_norm", "Gradient entering each layer (log10 norm)", True, "Hot"),
        (
            "fig-heat-sat",
            "act_saturated",
            "Activations at rest or saturated (share)",
            False,
            "Greys",
        ),
    ):
        z = _log10(view["heat"][stat]) if log else view["heat"][stat]
        extra = {"zmid": 0, "reversescale": True} if scale == "RdBu" else {}
        figs[gid] = figure(
            [heatmap(z, layers, view["heat_steps"], transpose=True, colorscale=scale, **extra)],
            title,
            height=max(220, 60 + 18 * len(layers)),
            xaxis={"title": "step"},
        )
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
                trace(d["running_mean"], "running mean", COLORS[1]),
                trace(d["pre_var"], "batch variance", COLORS[0], **low),
                trace(d["running_var"], "running variance", COLORS[1], **low),
            ],
            f"{layer}: batch against running statistics (channel averages)",
            height=380,
            rows=2,
        )
        figs["fig-affine"] = figure(
            [
                trace(d["running_mean_gap"], "running-mean gap (RMS)", COLORS[0]),
                trace(d["running_var_gap"], "running-variance gap (RMS)", COLORS[1]),
                trace(d["gamma"], "gamma", COLORS[2], **low),
                trace(d["beta"], "beta", COLORS[3], **low),
            ],
            f"{layer}: running-statistics gap; gamma and beta (channel averages)",
            height=380,
            rows=2,
        )
        figs["fig-grads"] = figure(
            [
                trace(d[s], s.replace("_", " "), COLORS[i])
                for i, s in enumerate(
                    ("weight_grad_norm", "gamma_grad_norm", "beta_grad_norm", "weight_norm")
                )
            ],
            f"{layer}: gradient norms, and the norm of the weight feeding BN",
            yaxis={"type": "log"},
        )
        units = sorted({int(k.split("_")[1]) for k in d if k.startswith("p50_")})
        traces = []
        for j in units:
            c = COLORS[j % len(COLORS)]
            traces += [
                trace(d[f"p15_{j}"], f"unit {j} 15%", c, showlegend=False, line={"width": 0}),
                trace(
                    d[f"p85_{j}"],
                    f"unit {j} 15-85%",
                    c,
                    fill="tonexty",
                    line={"width": 0},
                    opacity=0.3,
                ),
                trace(d[f"p50_{j}"], f"unit {j} median", c),
            ]
        figs["fig-pct"] = figure(
            traces,
            f"{layer}: activation input of tracked units, "
            "15/50/85th percentiles (Ioffe & Szegedy, Fig. 1)",
        )
        for gid, cols in (
            ("fig-layer", ["pre_mean", "running_mean", "pre_var", "running_var"]),
            ("fig-affine", ["running_mean_gap", "running_var_gap", "gamma", "beta"]),
            ("fig-grads", ["weight_grad_norm", "gamma_grad_norm", "beta_grad_norm", "weight_norm"]),
            ("fig-pct", [f"p{q}_{j}" for j in units for q in (15, 85, 50)]),
        ):
            live(gid, "layers", cols, list(range(len(cols))), layer=layer)

    figs["fig-channels"] = channel_figure(view["channels"], layers)
    specs.append({"graph": "fig-channels", "kind": "channels", "table": "channels"})
    if view["last_step"]:  # records came, but none for these: say so instead of empty axes
        notes = (view["run"].get("meta") or {}).get("not_recorded") or {}
        for gid, fig in figs.items():
            if not _has_data(fig):
                reason = notes.get(_NOTE_FOR.get(gid, ""), "")
                mark_empty(fig, "not recorded for this run" + (f": {reason}" if reason else ""))
    return figs, specs


#: Which of a run's "not recorded" notes (bncore.watch) explains an empty figure.
_NOTE_FOR = {"fig-heat-sat": "act", "fig-grads": "weight"}


def _has_data(fig: Figure) -> bool:
    for trace in fig["data"]:
        for key in ("y", "z"):
            values = np.asarray(trace.get(key) or [], dtype=object).ravel()
            if any(v is not None and v == v for v in values):  # v == v: not NaN
                return True
    return False


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
                colorbar={"x": 0.45, "thickness": 10},
                name="batch mean",
            ),
            heatmap(
                grid("pre_var", True),
                names,
                colorscale="Viridis",
                xaxis="x2",
                name="batch variance (log10)",
            ),
        ],
        "Per-channel batch mean (left) and log10 variance (right), layer x channel"
        + (f", step {step}" if step is not None else ""),
        height=max(240, 80 + 18 * len(names)),
        xaxis={"domain": [0, 0.42], "title": "channel"},
        xaxis2={**_AXIS, "domain": [0.55, 1.0], "title": "channel", "anchor": "y"},
    )


def compare_figures(runs: list[dict[str, Any]], stat: str) -> dict[str, Figure]:
    """Runs overlaid: loss, test accuracy, and one statistic at one layer position."""
    loss, acc, st = [], [], []
    for i, r in enumerate(runs):
        c, name = COLORS[i % len(COLORS)], f"{r['name']} ({r['status']})"
        loss.append(trace(r["loss"], name, c))
        acc.append(trace(r["test_acc"], name, c, mode="lines+markers"))
        st.append(trace(r["stat"], f"{name} {r['layer']}", c))
    return {
        "cmp-loss": figure(loss, "Training loss", yaxis={"type": "log"}),
        "cmp-acc": figure(acc, "Test accuracy"),
        "cmp-stat-fig": figure(
            st,
            f"{STAT_LABELS.get(stat, stat)} at the chosen layer",
            yaxis={"type": "log" if stat in STATISTICS and STATISTICS[stat].log else "linear"},
        ),
    }


def experiment_figure(panel: dict[str, Any]) -> Figure:
    """One panel of an experiment's result (bncore.experiments.result): measured lines solid,
    theory dashed in the colour of the measurement it belongs to; None is a gap."""
    traces: list[dict[str, Any]] = []
    colors: dict[str, str] = {}
    for s in panel["series"]:
        base = s["name"].split(": ")[0] if s["theory"] else s["name"]
        color = colors.setdefault(base, COLORS[len(colors) % len(COLORS)])
        y = np.array([np.nan if v is None else v for v in s["y"]], dtype=float)
        kw: dict[str, Any] = {"mode": "lines+markers"} if panel["kind"] == "by_value" else {}
        if s["theory"]:
            kw["line"] = {"dash": "dash"}
        traces.append(line(s["x"], y, s["name"], color, **kw))
    return figure(
        traces,
        panel["title"],
        height=360,
        legend={"y": -0.32},
        xaxis={"title": {"text": panel["x_label"]}, "type": "log" if panel["log_x"] else "linear"},
        yaxis={"title": {"text": panel["y_label"]}},
    )

"""The figure factory: :func:`figure` holds every rule of axes, titles and legends; the traces
(:func:`line`, :func:`trace`, :func:`heatmap`) are plain dicts of plain lists."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.colors

Figure = dict[str, Any]  # plotly's JSON figure: plain dicts are far cheaper than Figure

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
          "#e377c2", "#7f7f7f", "#bcbd22")  # fmt: skip
#: Every axis. ``ticklabeloverflow`` "allow": the margins hold the labels (:func:`_fit_margins`);
#: plotly's default measured each label again to hide those past the figure's edge.
AXIS = {"gridcolor": "#eef2f7", "zeroline": False, "automargin": True, "ticklabeloverflow": "allow"}
#: The longest line of a figure's title, in characters: under 360 px at its 14 px, a phone's
#: figure (390 px) less its border; a longer title is wrapped (:func:`wrapped`).
TITLE_LINE = 46
#: Every log axis's ticks. Plotly picks a log axis's ticks from its span in decades over
#: ``nticks``: under one decade, linear ticks, each labelled in full (0.3, 0.4, 0.5); up to
#: 0.7 * nticks decades, 1-2-5 ("D2") or every digit ("D1", from 0.3 * nticks down), labelled,
#: by default, by their leading digit alone ("2, 1, 9, 8": 0.9 reads as 9); beyond, powers of
#: ten. nticks 3 never picks "D1" (9 labels a decade), and "complete" labels the 2s and 5s in
#: full (2x10^-1): at most 8 labels, each a whole number in plain or scientific form.
LOG_TICKS = {"nticks": 3, "exponentformat": "power", "minorloglabels": "complete"}


#: Every heatmap's colour scale, by what its values are, as explicit colour lists: plotly.js and
#: plotly.py give the same names other directions ("RdBu", "Greys"), so a named scale drew
#: positive means blue in the dashboard and red in the report. ``zmid``: the value drawn white
#: (a signed quantity); ``zmin``/``zmax``: a fixed range (a share is read against 0 and 1, not
#: against its own spread: 0.5 at rest is a normal ReLU).
SCALES: dict[str, dict[str, Any]] = {
    "signed": {"colors": plotly.colors.diverging.RdBu_r, "zmid": 0},  # negative blue
    "magnitude": {"colors": plotly.colors.sequential.Viridis},
    "gradient": {"colors": plotly.colors.sequential.Hot},
    "share": {"colors": plotly.colors.sequential.Greys, "zmin": 0, "zmax": 1},
}
#: A figure's height, in px, as assets/style.css gives its cell (.graph; .graph.tall: figures of
#: two panels or of a long legend): a figure plotly draws before its cell has a size keeps the
#: height it was given, so that must be the cell's (else a 300 px figure in a 340 px cell).
HEIGHT, TALL_HEIGHT = 340, 470
#: Every figure's margins before what it holds widens them (:func:`_fit_margins`), in px.
MARGIN = {"l": 80, "r": 30, "b": 50}
#: A dotted line is the earlier of two moments (the first evaluation); the solid one the latest.
EARLIER = {"dash": "dot"}


def figure(
    traces: list[dict[str, Any]],
    title: str,
    x_title: str,
    y_title: str,
    height: int = HEIGHT,
    rows: int = 1,
    **layout: Any,
) -> Figure:
    """A figure whose axes say what they show (``x_title``, ``y_title``, with units); with
    rows=2, traces carrying yaxis 'y2' go to a lower panel sharing x (name it in ``yaxis2``).
    Every log axis gets few tick labels, each a whole number (:data:`LOG_TICKS`)."""
    lay: dict[str, Any] = {
        "title": {"text": wrapped(title), "font": {"size": 14}, "x": 0.01},
        # the title, in the middle of the top margin, clear of the plot whatever its lines
        "margin": {**MARGIN, "t": top_margin(wrapped(title).count("<br>") + 1)},
        "height": height,
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "uirevision": "keep",
        # below the x axis's title, at the bottom of the figure, whatever its height
        "legend": {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
        "xaxis": {**AXIS, "title": {"text": x_title}},
        "yaxis": {**AXIS, "title": {"text": y_title}},
    }
    if rows == 2:
        lay["yaxis"]["domain"] = [0.55, 1.0]
        lay["yaxis2"] = {**AXIS, "domain": [0.0, 0.45], "anchor": "x"}
        lay["xaxis"]["anchor"] = "y2"
    _categories(lay, traces)
    for key, value in layout.items():
        if isinstance(value, dict) and isinstance(lay.get(key), dict):
            lay[key] = {**lay[key], **value}
        else:
            lay[key] = value
    for key, axis in lay.items():
        if key[1:5] == "axis" and isinstance(axis, dict) and axis.get("type") == "log":
            for name, value in LOG_TICKS.items():
                axis.setdefault(name, value)
    for trace in traces:
        trace.setdefault("hovertemplate", hover(trace, lay))
    _fit_margins(lay, traces)
    return {"data": traces, "layout": lay}


def _fit_margins(lay: dict[str, Any], traces: list[dict[str, Any]]) -> None:
    """Margins that already hold the legend, colour bars and layer names: plotly's automargin
    (kept, for what is not foreseen here) draws a figure twice when it has to widen one, which
    doubled the time to draw a run's first screen."""
    margin = lay["margin"]
    shown = [t for t in traces if t.get("showlegend", True) is not False and t.get("name")]
    if shown and lay.get("showlegend", True) and not all(t["type"] == "heatmap" for t in shown):
        margin["b"] = 52 + 20 * min(5, 1 + len(shown) // 2)  # room for the legend
    if any(t.get("type") == "heatmap" and t.get("showscale", True) for t in traces):
        margin["r"] = max(margin["r"], 100)  # the colour bar, its ticks and title
    for key, axis in lay.items():
        if not (key.startswith("yaxis") and isinstance(axis, dict)):
            continue
        side = "r" if axis.get("side") == "right" else "l"
        # tick labels: 0.0015 or 5x10^-4 (a log axis), beside the axis title
        margin[side] = max(margin[side], 92 if axis.get("type") == "log" else 80)
        if axis.get("type") == "category":
            names = [
                v for t in traces if t.get("yaxis", "y") == "y" + key[5:] for v in t.get("y") or []
            ]
            size = (axis.get("tickfont") or {}).get("size", 12)
            longest = max((len(str(v)) for v in names), default=0)
            margin["l"] = max(margin["l"], round(0.6 * size * longest) + 34)


def hover(trace: dict[str, Any], lay: dict[str, Any]) -> str:
    """What a hover says: the statistic (the trace's name, a heatmap's colour-bar title with its
    unit) and its value, and where, each named as its axis is (never "x: 501 y: block2")."""

    def title(axis: str) -> str:
        text = ((lay.get(axis) or {}).get("title") or {}).get("text") or ""
        return text.replace("<br>", " ").replace(" (log)", "")

    x, y = (
        title(trace.get("xaxis", "x").replace("x", "xaxis", 1)),
        title(trace.get("yaxis", "y").replace("y", "yaxis", 1)),
    )
    if trace.get("type") == "heatmap":
        unit = (trace.get("colorbar") or {}).get("title", {}).get("text") or trace.get("name", "")
        return f"{y or 'y'} %{{y}}<br>{x or 'x'} %{{x}}<br><b>{unit}: %{{z:.4g}}</b><extra></extra>"
    name = trace.get("name") or y
    value = f"{y}: " if y and y != name else ""
    return f"{name}<br>{x or 'x'} %{{x}}<br>{value}<b>%{{y:.4g}}</b><extra></extra>"


def top_margin(lines: int) -> int:
    """The top margin, in px, that holds a title of ``lines`` lines."""
    return 16 + 20 * lines


def wrapped(title: str, width: int = TITLE_LINE) -> str:
    """A title in lines of at most ``width`` characters where it has spaces to break at
    (plotly never wraps a title: a long one runs off a phone's screen); its own breaks kept."""
    lines = []
    for text in title.split("<br>"):
        line = ""
        for word in text.split(" "):
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "<br>".join(lines)


def _categories(lay: dict[str, Any], traces: list[dict[str, Any]]) -> None:
    """Layer names ("1", "4", "layer1.0.bn1") are names, never numbers: an axis of strings is
    a category axis."""
    for trace in traces:
        for axis in ("x", "y"):
            values = trace.get(axis)
            if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
                key = trace.get(f"{axis}axis", axis).replace(axis, f"{axis}axis", 1)
                # every layer labelled (plotly drops every second one of 20), small if many
                axis = lay.setdefault(key, dict(AXIS))
                axis.update(type="category", dtick=1)
                if len(values) > 12 and key.startswith("y"):
                    axis["tickfont"] = {"size": 10}


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


def heatmap(
    z: np.ndarray, y: list[str], x: Any = None, scale: str = "magnitude", unit: str = "", **kw: Any
) -> dict[str, Any]:
    """A heatmap coloured by :data:`SCALES` [``scale``], its colour bar titled ``unit``."""
    spec = dict(SCALES[scale])
    colors = spec.pop("colors")
    colorscale = [[i / (len(colors) - 1), c] for i, c in enumerate(colors)]
    colorbar = {"thickness": 10, "title": {"text": unit, "side": "right"}, **kw.pop("colorbar", {})}
    trace = {"type": "heatmap", "z": plain(z), "y": list(y), "colorscale": colorscale,
             "colorbar": colorbar, "name": unit, **spec, **kw}  # fmt: skip
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


def tint(color: str, alpha: float = 0.18) -> str:
    """A see-through fill of a #rrggbb colour, so that overlapping bands stay apart."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def log10(a: np.ndarray) -> np.ndarray:
    """log10 where positive, NaN (a gap) elsewhere."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, np.log10(a), np.nan)


def has_data(fig: Figure, yaxis: str | None = None, positive: bool = False) -> bool:
    """Whether any trace (of the panel of ``yaxis``, "y" or "y2", if given) has a value to
    draw (not None, not NaN; with ``positive``, above 0: what a log axis can draw)."""
    for trace in fig["data"]:
        if yaxis is not None and trace.get("yaxis", "y") != yaxis:
            continue
        # a heatmap's y are its rows' names: only its z are values
        for key in ("z",) if trace.get("type") == "heatmap" else ("y",):
            values = np.asarray(trace.get(key) or [], dtype=object).ravel()
            if any(v is not None and v == v and (not positive or v > 0) for v in values):
                return True  # v == v: not NaN
    return False


def nothing(text: str) -> Figure:
    """An empty figure that says why (no axes to read)."""
    fig = figure([], "", "", "", height=220)
    mark_empty(fig, text)
    return fig


def mark_empty(fig: Figure, text: str, yaxis: str | None = None) -> None:
    """An empty figure says why it is empty, in the middle of its plot, with no axes (plotly
    would invent their ranges: -1 to 6, a log axis from 10^-1 to 10^4); with ``yaxis`` ("y2"),
    an empty panel of a figure of two, in the middle of that panel, its axes kept."""
    if yaxis is None:
        for key, axis in fig["layout"].items():
            if key[1:5] == "axis" and isinstance(axis, dict):
                axis["visible"] = False
        # assets/live.js draws it again, with its axes, when records come for it
        fig["layout"]["meta"] = {"empty": True}
    where = {"yref": f"{yaxis} domain"} if yaxis else {"yref": "paper"}
    note = {"text": wrapped(text), "xref": "paper", "x": 0.5, "y": 0.5, "showarrow": False,
            "font": {"size": 13, "color": "#6b7280"}, **where}  # fmt: skip
    kept = fig["layout"].get("annotations", []) if yaxis else []
    fig["layout"]["annotations"] = [*kept, note]


def waiting(fig: Figure, text: str) -> None:
    """A figure before its run's first record: ``text`` in place of its axes. Its traces stay,
    to be extended."""
    mark_empty(fig, text)


#: How a marked step is drawn: a dashed red line across the figure, labelled at its top.
MARK_COLOR = "#b91c1c"


def mark_step(fig: Figure, step: int, label: str) -> None:
    """A vertical line at ``step`` on a figure over steps (its x axis titled "step"), labelled;
    nothing on a figure of another x axis, or with nothing drawn."""
    lay = fig["layout"]
    if ((lay.get("xaxis") or {}).get("title") or {}).get("text") != "step" or not has_data(fig):
        return
    line = {"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0,
            "y1": 1, "line": {"color": MARK_COLOR, "width": 1.5, "dash": "dash"}}  # fmt: skip
    note = {"x": step, "xref": "x", "y": 1, "yref": "paper", "text": label, "showarrow": False,
            "xanchor": "left", "yanchor": "top", "font": {"color": MARK_COLOR, "size": 11},
            "bgcolor": "rgba(255,255,255,0.8)"}  # fmt: skip
    lay["shapes"] = [*lay.get("shapes", []), line]
    lay["annotations"] = [*lay.get("annotations", []), note]

"""A figure declared once. Its lines name statistics of bncore.statistics, which give each line
its records table and, unless the declaration names it otherwise, its label in the legend. From
the one declaration come both the figure, drawn from a run view (dashboard.data.run_view), and
its live spec: what assets/live.js extends the figure with as a run's records stream in.

The live specs, as assets/live.js reads them:

- ``line``: ``{graph, kind, table, columns, traces, max[, layer]}``: trace ``traces[i]`` grows
  by column ``columns[i]`` of the batch's ``table`` (its rows of ``layer``), to ``max`` points;
- ``heat``: ``{graph, kind, table, column, log, layers, max}``: a step column more of a
  layer x step heatmap (log10 of the values if ``log``);
- ``latest``: ``{graph, kind, table, columns, layers}``: trace i over the layers becomes the
  latest values of ``columns[i]``;
- ``channels``: ``{graph, kind, table, title}``: the per-channel heatmaps, rebuilt.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bncore import statistics
from bncore.statistics import Statistic
from dashboard.figures.factory import (
    COLORS,
    HEIGHT,
    Figure,
    figure,
    heatmap,
    line,
    log10,
    trace,
)

Spec = dict[str, Any]
View = dict[str, Any]  # what dashboard.data.run_view reads for the run view
Drawn = tuple[Figure, list[Spec]]

MAX_LIVE_POINTS = 5_000  # per line trace while a run streams
MAX_LIVE_COLUMNS = 1_000  # per heatmap while a run streams
MARKED: Mapping[str, Any] = {"mode": "lines+markers"}
DOTTED: Mapping[str, Any] = {"line": {"dash": "dot"}}
#: Where a run view keeps the series of each records table (dashboard.data.run_view).
SOURCES = {"steps": "lines", "evals": "evals", "layers": "detail"}
_EMPTY = (np.empty(0, np.int64), np.empty(0))


def registered(name: str) -> Statistic:
    """The statistic a figure draws, from the registry (the percentiles and replicas too)."""
    found = statistics.lookup(name)
    if found is None:
        raise KeyError(statistics.unknown(name))
    return found


@dataclass(frozen=True)
class Line:
    """One line of a figure: the statistic ``stat``, in colour ``COLORS[color]``, named
    ``label`` or else as the registry names it; ``lower``: on the second y axis (the lower
    panel of two, or the right-hand axis); ``style``: more plotly trace keys."""

    stat: str
    color: int
    label: str | None = None
    lower: bool = False
    style: Mapping[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> str:
        return registered(self.stat).table

    @property
    def name(self) -> str:
        return self.label or registered(self.stat).label

    def trace_keys(self) -> dict[str, Any]:
        """The plotly keys of its trace besides the values and the name."""
        keys = copy.deepcopy(dict(self.style))
        if self.lower:
            keys["yaxis"] = "y2"
        return {"color": COLORS[self.color % len(COLORS)], **keys}


class Declared(Protocol):
    """A figure of the run view: its graph id, and its drawing from a view (None: nothing to
    draw in this view)."""

    @property
    def graph(self) -> str: ...

    def draw(self, view: View) -> Drawn | None: ...


@dataclass(frozen=True)
class Lines:
    """Statistics over steps, grown live from their tables. ``lines``: fixed, or a function of
    the view (the units and replicas a run has); ``of_layer``: the chosen layer's statistics
    (``{layer}`` in the title names it; nothing is drawn until a layer is chosen);
    ``layout``: more of :func:`~dashboard.figures.factory.figure`'s arguments."""

    graph: str
    title: str
    x_title: str
    y_title: str
    lines: tuple[Line, ...] | Callable[[View], list[Line]]
    of_layer: bool = False
    layout: Mapping[str, Any] = field(default_factory=dict)

    def lines_of(self, view: View) -> list[Line]:
        return list(self.lines(view) if callable(self.lines) else self.lines)

    def draw(self, view: View) -> Drawn | None:
        layer = view["layer"]
        if self.of_layer and not layer:
            return None
        lines = self.lines_of(view)
        traces = [trace(series(view, ln), ln.name, **ln.trace_keys()) for ln in lines]
        title = self.title.format(layer=layer)
        fig = _figure(traces, title, self.x_title, self.y_title, self.layout)
        return fig, line_specs(self.graph, lines, layer if self.of_layer else None)


def _figure(
    traces: list[dict[str, Any]], title: str, x_title: str, y_title: str, layout: Mapping[str, Any]
) -> Figure:
    """:func:`~dashboard.figures.factory.figure` with a declaration's layout (a copy: the
    figure may change its own)."""
    return figure(traces, title, x_title, y_title, **copy.deepcopy(dict(layout)))


def series(view: View, ln: Line) -> tuple[Any, Any]:
    """A line's (steps, values) in the run view (empty where the run has none)."""
    return view[SOURCES[ln.table]].get(ln.stat, _EMPTY)


def line_specs(graph: str, lines: list[Line], layer: str | None) -> list[Spec]:
    """How a figure of lines grows live: one spec per records table its lines come from."""
    traces: dict[str, list[int]] = {}
    for i, ln in enumerate(lines):
        traces.setdefault(ln.table, []).append(i)
    return [
        {"graph": graph, "kind": "line", "table": table,
         "columns": [lines[i].stat for i in idx], "traces": idx, "max": MAX_LIVE_POINTS,
         **({"layer": layer} if layer else {})}
        for table, idx in traces.items()
    ]  # fmt: skip


@dataclass(frozen=True)
class Heat:
    """A layer x step heatmap of one statistic (log10 where the registry draws it on a log
    axis), a step column more with each live batch; ``scale``: its colours (factory.SCALES);
    ``unit``: its colour bar's title."""

    graph: str
    stat: str
    title: str
    scale: str
    unit: str

    def draw(self, view: View) -> Drawn:
        stat, layers = registered(self.stat), view["layers"]
        z = log10(view["heat"][self.stat]) if stat.log else view["heat"][self.stat]
        fig = figure(
            [heatmap(z, layers, view["heat_steps"], self.scale, self.unit, transpose=True)],
            self.title,
            "step",
            "layer",
            height=max(HEIGHT, 80 + 18 * len(layers)),
        )  # fmt: skip
        spec = {"graph": self.graph, "kind": "heat", "table": stat.table, "column": self.stat,
                "log": stat.log, "layers": layers, "max": MAX_LIVE_COLUMNS}  # fmt: skip
        return fig, [spec]


@dataclass(frozen=True)
class Latest:
    """Statistics over the layers at the latest step (the run view's ``depth``), redrawn from
    each live batch's last rows; its lines come from one table."""

    graph: str
    title: str
    x_title: str
    y_title: str
    lines: tuple[Line, ...]
    layout: Mapping[str, Any] = field(default_factory=dict)

    def draw(self, view: View) -> Drawn:
        layers = view["layers"]
        traces = [line(layers, view["depth"][ln.stat], ln.name, **ln.trace_keys())
                  for ln in self.lines]  # fmt: skip
        fig = _figure(traces, self.title, self.x_title, self.y_title, self.layout)
        spec = {"graph": self.graph, "kind": "latest", "table": self.lines[0].table,
                "columns": [ln.stat for ln in self.lines], "layers": layers}  # fmt: skip
        return fig, [spec]


@dataclass(frozen=True)
class Drawing:
    """A figure drawn by a function of its own: the view -> the figure and its live specs."""

    graph: str
    draw_view: Callable[[View], Drawn]

    def draw(self, view: View) -> Drawn:
        return self.draw_view(view)

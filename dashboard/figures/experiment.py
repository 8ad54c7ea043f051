"""An experiment's result panels (bncore.science.experiments.result), drawn."""

from __future__ import annotations

from typing import Any

import numpy as np

from dashboard.figures.factory import COLORS, Figure, figure, line


def experiment_figure(panel: dict[str, Any]) -> Figure:
    """One panel of an experiment's result: measured lines solid, theory dashed in the colour
    of the measurement it belongs to; None is a gap."""
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

"""Runs overlaid: their loss, test accuracy, and one statistic at one layer position."""

from __future__ import annotations

from typing import Any

from bncore.statistics import STATISTICS
from dashboard.figures.factory import COLORS, Figure, figure, trace

#: Per-layer statistics a user can pick to compare runs by (bncore.statistics).
STAT_LABELS = {s.name: s.label for s in STATISTICS.values() if s.compare}


def compare_figures(runs: list[dict[str, Any]], stat: str) -> dict[str, Figure]:
    """The Compare tab's figures by graph id, from dashboard.data.compare_view's runs."""
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
            stat_axis(stat),
            yaxis={"type": "log" if stat in STATISTICS and STATISTICS[stat].log else "linear"},
        ),
    }


def stat_axis(name: str) -> str:
    """A statistic's axis title: its label, its unit, and (log) where drawn so."""
    stat = STATISTICS.get(name)
    if stat is None:
        return name
    unit = f" ({stat.unit})" if stat.unit else ""
    return stat.label + unit + (" (log)" if stat.log else "")

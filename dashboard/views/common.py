"""What several views share: a failure's words, the ticked rows, a figure's cell and its
caption, tabs."""

from __future__ import annotations

from typing import Any

from dash import State, dcc, html

from bncore.statistics import Documented

#: The statistics' documentation (dashboard.glossary), where each caption links to.
STATISTICS_PAGE = "/dashboard/statistics"
NEEDS_TOKEN = "this server needs its token: type it in the Launch tab"
SELECT_FIRST = "select a run first (tick its box)"
#: Figures of two stacked panels, or of a long legend (the percentiles' six lines): drawn taller
#: (dashboard.figures.factory.TALL_HEIGHT, as the stylesheet's .graph.tall).
TALL = ("fig-layer", "fig-affine", "fig-scale", "fig-replicas", "fig-channels", "fig-pct")


def failed(text: str, label: str = "error") -> list[Any]:
    """A failure, tagged (``label``), then what it was."""
    return [html.Span(label, className="status status-failed"), text]


#: The runs list's rows and which of them are ticked (read by :func:`chosen`).
TICKED = (State("runs-table", "data"), State("runs-table", "selected_rows"))


def chosen(rows: list[dict] | None, selected: list[int] | None) -> list[str]:
    """The ids of the runs ticked in the runs table (a ticked sweep's row: its runs)."""
    ticked = [rows[i] for i in selected or [] if rows and i < len(rows)]
    ids = [i for row in ticked for i in (row.get("runs") or row["id"]).split(",")]
    return list(dict.fromkeys(ids))


def graph(gid: str) -> dcc.Graph:
    """A figure that fills its cell's width (the height comes from the stylesheet)."""
    cls = "graph tall" if gid in TALL else "graph"
    return dcc.Graph(id=gid, config={"displaylogo": False, "responsive": True}, className=cls)


def captioned(gid: str, about: Documented) -> html.Div:
    """A figure with its one-line caption below: what to look for in it (the registry's
    LOOK_FOR of the statistic it is ``about``), linking to that statistic's documentation."""
    link = html.A(f"about {about.shown.removesuffix(', log axis')}", target="_blank",
                  href=f"{STATISTICS_PAGE}#{about.anchor}")  # fmt: skip
    caption = html.P([f"Look for {about.look_for}. ", link], className="caption")
    return html.Div([graph(gid), caption], id=f"cell-{gid}", className="cell")


def tabs(tab_id: str, value: str, children: list[dcc.Tab]) -> dcc.Tabs:
    """Tabs that stay one compact, scrollable row on a phone (no stacked menu)."""
    return dcc.Tabs(
        id=tab_id,
        value=value,
        children=children,
        mobile_breakpoint=0,
        className="tabs",
        parent_className="tabs-row",
    )

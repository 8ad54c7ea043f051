"""Which view is open. The address bar follows the view (``?tab=run&run=ID&section=layer&
layer=NAME``, ``?tab=compare&compare=A,B``, ``?tab=experiments&sweep=ID``), so any view can be
shared by its link; a link opens its view; the runs list's Open and Compare open the ticked
runs. ``&step=N&mark=TEXT`` marks a step on the run's figures (the Diagnosis panel's layer
links: where a rule fired)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode

from dash import Input, Output, State, no_update

from dashboard.views.common import SELECT_FIRST, TICKED, chosen
from dashboard.views.run import SECTIONS
from dashboard.wiring import callback

#: The top-level tabs: the ``tab`` of a shared link.
TABS = ("runs", "run", "compare", "launch", "experiments", "calculator")
#: What says which view is open: the run in view, the runs compared, the tab, the run's section.
OPEN_VIEW = (("view-run", "data"), ("compare-runs", "data"), ("tabs", "value"),
             ("section", "value"))  # fmt: skip


class View(NamedTuple):
    """What a link asks to see (None: not said)."""

    run: str | None
    compare: list[str] | None
    tab: str | None
    section: str | None
    layer: str | None
    step: int | None = None
    mark: str | None = None
    sweep: str | None = None


def view_of(query: Mapping[str, str]) -> View:
    """The view a link's parameters name (``?run=ID`` alone means its run view)."""
    run = query.get("run") or None
    compare = [i for i in query.get("compare", "").split(",") if i] or None
    sweep = (query.get("sweep") or "")[:64] or None
    tab = query.get("tab") or (
        "run" if run else "compare" if compare else "experiments" if sweep else None
    )
    section = query.get("section")
    step = query.get("step", "")
    return View(
        run,
        compare,
        tab if tab in TABS else None,
        section if section in SECTIONS else None,
        query.get("layer") or None,
        int(step) if step.isdigit() and len(step) < 19 else None,
        (query.get("mark") or "")[:64] or None,
        sweep,
    )


def query_of(search: str | None) -> dict[str, str]:
    """An address's parameters (``?a=1&b=2``), the first value of each."""
    return {k: v[0] for k, v in parse_qs((search or "").lstrip("?")).items()}


@callback(
    *(Output(*prop) for prop in OPEN_VIEW),
    Output("want-layer", "data"),
    Output("runs-note", "children"),
    Input("open-run", "n_clicks"),
    Input("open-compare", "n_clicks"),
    Input("url", "search"),
    *TICKED,
    *(State(*prop) for prop in OPEN_VIEW),
    prevent_initial_call=True,  # the page's layout opens its link's view (dashboard.app.layout)
    service=False,
    trigger=True,
)
def open_runs(
    fired: Any,
    _a: int,
    _b: int,
    search: str | None,
    rows: list[dict],
    selected: list[int],
    run_now: str | None,
    compare_now: list[str] | None,
    tab_now: str,
    section_now: str,
) -> tuple[Any, ...]:
    """A link followed in the page (``fired``: "url"; None where the page's own address was
    not known to its layout) opens what it names, where that is not open already; Open, the
    first ticked run; Compare, the ticked runs."""
    keep = no_update
    if fired in (None, "url"):
        view = view_of(query_of(search))
        return (
            view.run if view.run and view.run != run_now else keep,
            view.compare if view.compare and view.compare != compare_now else keep,
            view.tab if view.tab and view.tab != tab_now else keep,
            view.section if view.section and view.section != section_now else keep,
            view.layer or keep,
            "",
        )
    ids = chosen(rows, selected)
    if not ids:
        return keep, keep, keep, keep, keep, SELECT_FIRST
    if fired == "open-run":
        return ids[0], keep, "run", keep, keep, ""
    if len(ids) < 2:
        return keep, keep, keep, keep, keep, "select two or more runs to compare"
    return keep, ids, "compare", keep, keep, ""


@callback(
    Output("url", "search"),
    *(Input(*prop) for prop in OPEN_VIEW),
    Input("layer-select", "value"),
    Input("exp-pick", "value"),
    State("url", "search"),
    State("want-step", "data"),
    prevent_initial_call=True,
    service=False,
)
def follow_view(
    run: str | None,
    compare: list[str] | None,
    tab: str,
    section: str,
    layer: str | None,
    sweep: str | None,
    search: str | None,
    marked: dict[str, Any] | None = None,
) -> Any:
    """The address of the view now open (no update where the address says it already), with
    the step marked on it (``marked``: dashboard.views.doctor.step_from_link) where it is that
    layer's; an experiment's result (``sweep``) at its own address."""
    query: dict[str, str] = {"tab": tab}
    if sweep and tab == "experiments":
        query["sweep"] = sweep
    if run and tab == "run":
        query["run"] = run
        query["section"] = section
        if section == "layer" and layer:
            query["layer"] = layer
            if marked and marked.get("run") == run and marked.get("layer") == layer:
                query["step"] = str(marked["step"])
                if marked.get("mark"):
                    query["mark"] = marked["mark"]
    if compare and tab == "compare":
        query["compare"] = ",".join(compare)
    wanted = "?" + urlencode(query, safe=",")
    return no_update if wanted == (search or "") else wanted

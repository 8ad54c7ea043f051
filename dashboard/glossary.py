"""The statistics' documentation as a page of the dashboard (``GET /dashboard/statistics``):
every statistic BN Scope records, what it means, its unit and what to look for in its chart,
each row at its own address (``#pre_var``), where the run view's figure captions link. Made
from bncore.statistics, as docs/statistics.md is."""

from __future__ import annotations

import html

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from bncore.statistics import TABLE_HEADINGS, documented
from dashboard.report import STYLE

#: The report's page style, and the row a link points at marked.
PAGE_STYLE = (
    f"{STYLE} tr:target {{ background: #fef9c3; }} code {{ font-size: 12px; }}"
    " table { display: block; overflow-x: auto; }"  # a phone scrolls the table, not the page
)


def statistics_html() -> str:
    """The page: one table per records table, a row per statistic."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>BN Scope: what it records</title><style>{PAGE_STYLE}</style></head><body>",
        "<h1>What BN Scope records</h1>",
        "<p>Every statistic, what it means and what to look for in its chart. "
        "<a href='/dashboard/'>Back to the dashboard</a>.</p>",
    ]
    rows = documented()
    for table, heading in TABLE_HEADINGS.items():
        parts += [f"<h2>{esc(heading.replace('`', ''))}</h2>",
                  "<table><tr><th>name</th><th>meaning</th><th>unit</th><th>shown as</th>"
                  "<th>what to look for</th></tr>"]  # fmt: skip
        for d in (d for d in rows if d.table == table):
            names = ", ".join(f"<code>{esc(n)}</code>" for n in d.names)
            anchor = d.anchor if table != "channels" else f"channels-{d.anchor}"
            parts.append(
                f"<tr id='{esc(anchor)}'><td>{names}</td><td>{esc(d.meaning)}</td>"
                f"<td>{esc(d.unit)}</td><td>{esc(d.shown)}</td><td>{esc(d.look_for)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def serve_statistics_page(app: FastAPI) -> None:
    """``GET /dashboard/statistics`` on the API's app (before the dashboard's mount)."""
    page = statistics_html()  # the registry is fixed: made once

    def statistics_page() -> HTMLResponse:
        """Every statistic BN Scope records, with what to look for in its chart."""
        return HTMLResponse(page, headers={"cache-control": "max-age=3600"})

    app.add_api_route(
        "/dashboard/statistics",
        statistics_page,
        methods=["GET"],
        response_class=HTMLResponse,
        tags=["dashboard"],
        summary="What every recorded statistic means, and what to look for in its chart",
    )

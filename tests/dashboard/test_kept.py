"""Dash's scripts kept in memory, gzipped (dashboard.kept), in front of a real Dash app."""

from __future__ import annotations

import gzip
import re

import flask
from a2wsgi import WSGIMiddleware
from dash import Dash, html
from starlette.testclient import TestClient

from dashboard.kept import KeptScripts


def test_dash_s_versioned_scripts_are_kept_gzipped_and_the_rest_passes_through():
    """A fingerprinted script reaches Flask once, then comes from memory, gzipped where asked
    for, the same bytes as Dash's; the layout, an unversioned address and a missing file reach
    Flask every time, as Flask answers them."""
    app = Dash(__name__)
    app.layout = html.Div("kept")
    reached: list[str] = []
    app.server.before_request(lambda: reached.append(flask.request.path))
    kept = KeptScripts(WSGIMiddleware(app.server))  # type: ignore[arg-type]
    client = TestClient(kept, raise_server_exceptions=False)

    page = client.get("/").text
    scripts = re.findall(r'src="(/_dash-component-suites/[^"]+\.v[0-9_]+m[0-9]+\.[^"]+)"', page)
    assert scripts, page
    renderer = next(s for s in scripts if "dash_renderer" in s)
    plain = client.get(renderer, headers={"accept-encoding": "identity"})
    zipped = client.get(renderer, headers={"accept-encoding": "gzip"})
    again = client.get(renderer, headers={"accept-encoding": "identity"})
    assert reached.count(renderer) == 1, reached
    assert "content-encoding" not in plain.headers and plain.content == again.content
    assert zipped.headers["content-encoding"] == "gzip" and zipped.content == plain.content
    assert int(zipped.headers["content-length"]) < len(plain.content) / 2
    assert zipped.headers["content-type"] == plain.headers["content-type"]
    assert "max-age=31536000" in zipped.headers["cache-control"]
    assert zipped.headers["vary"] == "accept-encoding"
    with client.stream("GET", renderer, headers={"accept-encoding": "gzip"}) as wire:
        raw = b"".join(wire.iter_raw())
    assert len(raw) == int(zipped.headers["content-length"])
    assert gzip.decompress(raw) == plain.content

    for address, status in [
        ("/_dash-layout", 200),
        ("/_dash-component-suites/dash/dcc/async-graph.js", 200),  # unversioned: an etag
        ("/_dash-component-suites/dash/nothing.v1_0_0m1.js", 500),  # Dash's own refusal
    ]:
        for _ in range(2):
            assert client.get(address).status_code == status, address
        assert reached.count(address) == 2, (address, reached)
    assert client.post("/_dash-update-component", json={}).status_code >= 400
    assert list(kept.kept) == [renderer + "?"]

"""/docs and /redoc on a machine without internet: every script and stylesheet of the two pages
is served by BN Scope itself (fastapi-offline), and, in a real Chromium, Swagger UI lists the
operations and ReDoc renders them without a request to anywhere else. And the schema they show
is what the server answers (schemathesis)."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree

import httpx
import pytest

from bnscope.process import ServerProcess

pytestmark = pytest.mark.timeout(180)
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
REDOC_CREDIT = "https://cdn.redoc.ly/redoc/logo-mini.svg"


class _Assets(HTMLParser):
    """The URLs a page loads: <script src>, <link href> (stylesheets, icons), <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        url = a.get("src") if tag in ("script", "img") else a.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("docs")).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_what_the_server_serves(server, page):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assets = _Assets()
        assets.feed(r.text)
        kinds = {u.rsplit(".", 1)[-1] for u in assets.urls}
        assert "js" in kinds and ("css" in kinds or page == "/redoc"), assets.urls
        origin = urlsplit(server.url).netloc
        for url in assets.urls:
            full = urljoin(server.url + page, url)
            assert urlsplit(full).netloc == origin, f"{page} loads {url} from elsewhere"
            got = http.get(full)
            assert got.status_code == 200 and got.content, (url, got.status_code)
        assert "/openapi.json" in r.text
        assert "cdn." not in r.text and "googleapis" not in r.text
        spec = http.get("/openapi.json").json()
        assert "/api/runs" in spec["paths"] and "ErrorOut" in spec["components"]["schemas"]


def test_docs_render_offline_in_a_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    from dashboard.browser import CHROMIUM, launch_browser

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    origin = urlsplit(server.url).netloc
    with sync_api.sync_playwright() as pw:
        browser = launch_browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            elsewhere: list[str] = []
            errors: list[str] = []

            def offline(route) -> None:  # as on a machine without internet
                parts = urlsplit(route.request.url)
                if parts.scheme in ("http", "https") and parts.netloc != origin:
                    elsewhere.append(route.request.url)
                    route.abort()
                else:
                    route.continue_()

            page.route("**/*", offline)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)  # an operation, drawn
            assert page.locator(".opblock").count() >= 10
            assert page.get_by_text("/api/runs/{run_id}/metrics").count() >= 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "api-docs.png"))
            page.goto(f"{server.url}/redoc")
            page.get_by_text("Queue a training run").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "api-redoc.png"))
            # ReDoc's sidebar credit is an <img> from its CDN that hides itself when it fails:
            # the one thing asked of elsewhere, and nothing depends on it
            assert set(elsewhere) <= {REDOC_CREDIT}, elsewhere
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.timeout(420)
def test_every_operation_answers_as_its_schema_says(tmp_path):
    """schemathesis over every operation of /openapi.json against a real server (loopback,
    bounded in examples and time): no 5xx, and every answer's status code, media type,
    headers and body as the schema documents them. Left out: whether every request the
    schema allows is accepted (positive_data_acceptance), which a schema cannot promise
    here: cross-field rules (norm.groups must divide model.width, ...), the per-run write
    token, and integers written as 2.0 (JSON Schema calls them integers; a config refuses
    them as it refuses the string "2")."""
    srv = ServerProcess(tmp_path, "--token", "s3cret").start()
    report = ARTIFACTS / "schemathesis.xml"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")), "run",
            f"{srv.url}/openapi.json", "--checks", "all",
            "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "10", "--seed", "1", "--request-timeout", "20",
            "-H", "Authorization: Bearer s3cret",
            "--report", "junit", "--report-junit-path", str(report),
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
        assert "generated" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
        failures = [
            case
            for failure in ElementTree.parse(report).iter("failure")
            for case in re.split(
                r"\n(?=\d+\. Test Case ID)",
                failure.get("message", "") + "\n" + (failure.text or ""),
            )
            # uvicorn's own answer to bytes that are not HTTP, before the app sees them
            if "Test Case ID" in case and "Invalid HTTP request received." not in case
        ]
        assert not failures, "\n".join(failures)[-8000:]
    finally:
        srv.stop()

"""``Client()`` with no URL (bnscope.local): it finds a BN Scope server at the default address
and nothing else there; the local server it starts ends with the script, even a killed one; one
that cannot start says why. (In a notebook, end to end: tests/bnscope/test_notebook.py.)"""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import bnscope.local
from bnscope.client import Client
from bnscope.process import ServerProcess, wait_for
from tests.helpers import closed_url, gone

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def answering(status: int, body: dict) -> Iterator[str]:
    """A stand-in server on 127.0.0.1 answering every GET with ``status`` and ``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_no_url_takes_a_bnscope_server_at_the_default_address_and_nothing_else(monkeypatch):
    health = {"status": "ok", "version": "0.1.0", "running": 0, "queued": 0}
    with answering(200, health) as bnscope_like:
        monkeypatch.setattr(bnscope.local, "DEFAULT_URL", bnscope_like)
        client = Client()
        assert client.url == bnscope_like and bnscope.local.local_server() is None
        assert client.dashboard_url == f"{bnscope_like}/dashboard/"
    with answering(404, {"detail": "Not Found"}) as other:
        assert not bnscope.local.is_bnscope(other)
    with answering(200, {"status": "ok"}) as other:  # another app's health check
        assert not bnscope.local.is_bnscope(other)
    assert not bnscope.local.is_bnscope(closed_url())
    explicit = closed_url()  # given, used as it is: nothing asked, nothing started
    assert Client(explicit + "/").url == explicit and bnscope.local.local_server() is None


SCRIPT = """
import json, os, sys, time
sys.modules["IPython"] = None  # show() without IPython: it prints the URL
import bnscope.local
bnscope.local.DEFAULT_URL = sys.argv[1]
from bnscope.client import Client
run = Client().create_run(name="killed")
run.show()
print(json.dumps({"server": bnscope.local.local_server().proc.pid,
                  "url": run.client.url}), flush=True)
time.sleep(120)
"""


def test_the_local_server_ends_with_a_script_killed_before_its_exit_handlers(tmp_path):
    """kill -9 of the script (as of a Jupyter kernel that does not answer its restart): no
    exit handler runs; the server sees its parent gone and shuts down by itself."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BNSCOPE_TOKEN": "not the local server's"}
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT, closed_url()],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as script:
        assert script.stdout is not None and script.stderr is not None
        try:
            shown, facts = script.stdout.readline(), script.stdout.readline()
            assert facts, f"the script ended: {script.wait(10)} {script.stderr.read()}"
            facts = json.loads(facts)
            url, pid = facts["url"], facts["server"]
            assert url.startswith("http://127.0.0.1:")
            run_id = shown.split()[3].rstrip(":")
            assert shown == f"BN Scope run {run_id}: {url}/dashboard/?tab=run&run={run_id}\n"
            # its own session: a Ctrl-C to the script's group (Jupyter's interrupt) misses it
            assert os.getsid(pid) == pid != os.getsid(script.pid)
            # no BNSCOPE_* of the script's: the run was created without a token
            assert httpx.get(f"{url}/api/runs/{run_id}").json()["status"] == "running"
            assert (tmp_path / "bnscope-data" / "bnscope.db").exists()
            script.send_signal(signal.SIGKILL)
            script.wait(10)
            wait_for(lambda: gone(pid), timeout=15)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/healthz", timeout=2)
        finally:
            if script.poll() is None:
                script.kill()
                script.wait(10)
        said = script.stderr.read()
    assert "BN Scope: no server at http://127.0.0.1:" in said and f"{url}/dashboard/" in said


def test_a_local_server_that_cannot_start_says_why(tmp_path, monkeypatch):
    (tmp_path / "bnscope-data").write_text("a file where the runs would go")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bnscope.local, "DEFAULT_URL", closed_url())
    with pytest.raises(RuntimeError) as failed:
        Client()
    said = str(failed.value)
    assert "bnscope serve (data in " in said and "exited with status 1" in said, said
    assert "File exists" in said, said  # the end of what it printed
    assert bnscope.local.local_server() is None


def test_the_inline_view_of_a_server_that_protects_reads_says_what_it_needs(tmp_path):
    """The token never goes into the notebook's output: the view says to open the run once
    with it; that first visit answers, and leaves the cookie the view then loads with."""
    token = "s3cret-of-the-server"
    srv = ServerProcess(tmp_path, "--token", token, "--protect-reads").start()
    try:
        client = Client(srv.url, token=token)
        run = client.create_run(name="protected")
        page = run._repr_html_()
        assert token not in page
        assert "This server protects reads" in page and "&amp;token=&lt;your token&gt;" in page
        view = run.dashboard_url
        assert f'<iframe src="{html.escape(view)}"' in page
        assert httpx.get(view, timeout=10).status_code == 401
        first = httpx.get(f"{view}&token={token}", timeout=30)
        assert first.status_code == 200 and first.cookies.get("bnscope_token") == token
        assert httpx.get(view, cookies=first.cookies, timeout=30).status_code == 200
        run.finish()
        client.close()
    finally:
        srv.stop()

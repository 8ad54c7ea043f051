"""BN Scope in a notebook with no server set up: a real Jupyter kernel (nbclient, ipykernel) runs a
notebook that trains a small BN model with ``Client()`` given no URL; the run, a cell's last
expression, and ``run.show()`` show its live view inline; the local server it started is shared,
outlives Jupyter's interrupt, and ends with the kernel."""

from __future__ import annotations

import html
import json
import re
import threading

import httpx
import pytest

from bnscope.process import wait_for
from tests.helpers import closed_url, gone

WHY = "a real Jupyter kernel needs nbformat, nbclient and ipykernel (pip install -e '.[test]')"
nbformat = pytest.importorskip("nbformat", reason=WHY)
nbclient = pytest.importorskip("nbclient", reason=WHY)
pytest.importorskip("ipykernel", reason=WHY)

from jupyter_core.utils import run_sync  # noqa: E402  (nbclient's own dependency)

CELLS = {
    # so that a BN Scope server someone runs on this machine at :8000 is not the one found
    "setup": "import bnscope.local\nbnscope.local.DEFAULT_URL = {closed!r}",
    "model": """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)""",
    "train": """
from bnscope.client import Client
client = Client()
run = client.create_run(name="in a notebook")
run.watch(model)
for step in range(1, 6):
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    run.log(step, loss)
run.flush()""",
    "last expression": "run",
    "show": "run.show()",
    "facts": """
import json
print(json.dumps({"url": client.url, "again": Client().url,
                  "server": bnscope.local.local_server().proc.pid}))""",
    "interrupted": """
import time
try:
    time.sleep(30)
except KeyboardInterrupt:
    print("interrupted")""",
    "after": "print(bnscope.local.is_bnscope(client.url), Client().url == client.url)",
}


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def inline_view(cell, output_type: str) -> str:
    """The URL of the iframe in the cell's HTML output of that type."""
    found = [o for o in cell.outputs if o.output_type == output_type]
    assert found, cell.outputs
    page = found[0].data["text/html"]
    src = re.search(r'<iframe src="([^"]+)"', page)
    assert src and "protects reads" not in page, page  # a local server has no token
    return html.unescape(src.group(1))


def test_a_notebook_trains_with_no_server_set_up_and_shows_the_run_inline(tmp_path):
    cells = {name: nbformat.v4.new_code_cell(code.strip()) for name, code in CELLS.items()}
    cells["setup"].source = CELLS["setup"].format(closed=closed_url())
    nb = nbformat.v4.new_notebook(cells=list(cells.values()))
    # its working directory: ./bnscope-data goes there
    kernel = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    with kernel.setup_kernel():  # the kernel stays up while its outputs are looked at
        for index, name in enumerate(("setup", "model", "train", "last expression", "show")):
            kernel.execute_cell(cells[name], index)

        view = inline_view(cells["last expression"], "execute_result")
        assert view == inline_view(cells["show"], "display_data")
        m = re.fullmatch(r"(http://127\.0\.0\.1:\d+)/dashboard/\?tab=run&run=(\w+)", view)
        assert m, view
        url, run_id = m.groups()
        page = httpx.get(view, timeout=30)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        run = httpx.get(f"{url}/api/runs/{run_id}", timeout=10).json()
        assert (run["name"], run["source"], run["status"]) == ("in a notebook", "client", "running")

        def layers():
            found = httpx.get(f"{url}/api/runs/{run_id}/layers", timeout=10).json()
            return found if found["layers"] else None

        recorded = wait_for(layers, timeout=20)
        assert recorded["layers"] == ["1"] and recorded["channels"] == [16]

        kernel.execute_cell(cells["facts"], 5)
        facts = json.loads(text_of(cells["facts"]))
        assert facts["url"] == facts["again"] == url  # one server for every Client()
        server = facts["server"]
        assert (tmp_path / "bnscope-data" / "bnscope.db").exists()

        # Jupyter's "interrupt kernel" signals the kernel's process group: the server is in a
        # session of its own, the training stops, the server does not
        done = threading.Event()

        def interrupt() -> None:
            while not done.wait(1.0):
                run_sync(kernel.km.interrupt_kernel)()

        interrupter = threading.Thread(target=interrupt)
        interrupter.start()
        try:
            kernel.execute_cell(cells["interrupted"], 6)
        finally:
            done.set()
            interrupter.join()
        assert text_of(cells["interrupted"]).strip() == "interrupted"
        kernel.execute_cell(cells["after"], 7)
        assert text_of(cells["after"]).strip() == "True True"
        assert not gone(server)
    # the kernel shut down: its exit handlers stopped the server
    wait_for(lambda: gone(server), timeout=20)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)

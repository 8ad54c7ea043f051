"""The Ray executor against a real local Ray cluster that the test starts on 127.0.0.1: runs
train as Ray tasks and report through the ingest API; cancel; a worker killed mid-run leaves
its run failed with its records."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bnscope.process import ServerProcess, wait_for
from tests.helpers import FINAL, tiny_run

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnscope[ray]')")
pytestmark = pytest.mark.timeout(600)


def _ray(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of 2 CPUs on loopback, in a temporary directory; stopped afterwards."""
    tmp = tmp_path_factory.mktemp("ray")
    port = 6390 + os.getpid() % 500
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
                   "--disable-usage-stats", f"--temp-dir={tmp}")  # fmt: skip
    if started.returncode != 0:
        pytest.fail(f"ray start failed: {started.stderr[-2000:]}")
    yield f"127.0.0.1:{port}"
    _ray("stop", "--force")


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), "--max-runs", "2", "--executor", "ray",
                        "--ray-address", cluster).start()  # fmt: skip
    yield srv
    srv.stop()


def _ended(api, run_id: str, timeout: float = 300) -> dict:
    return wait_for(
        lambda: (r := api.get(f"/api/runs/{run_id}").json())["status"] in FINAL and r, timeout
    )


def test_a_run_trains_as_a_ray_task_and_reports_through_the_api(server):
    with server.client() as api:
        run = api.post("/api/runs", json=tiny_run(steps=60)).json()
        done = _ended(api, run["id"])
        assert done["status"] == "completed", done.get("message")
        series = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()
        assert series["series"][0]["points_total"] == 60


def test_cancel_stops_the_task(server):
    with server.client() as api:
        run = api.post("/api/runs", json=tiny_run(steps=200_000, eval_interval=10_000)).json()
        wait_for(lambda: api.get(f"/api/runs/{run['id']}").json()["steps_done"] > 10, 240)
        assert api.post(f"/api/runs/{run['id']}/cancel").status_code in (200, 202)
        done = _ended(api, run["id"], 120)
        assert done["status"] == "cancelled"


def _task_pids() -> list[int]:
    """Ray worker processes running a run (their title is ray::<task name>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if cmd.startswith("ray::bnscope-run-") or "ray::main" in cmd:
            pids.append(int(entry.name))
    return pids


def test_a_worker_killed_mid_run_leaves_its_run_failed_with_its_records(server):
    with server.client() as api:
        run = api.post("/api/runs", json=tiny_run(steps=200_000, eval_interval=10_000)).json()
        wait_for(lambda: api.get(f"/api/runs/{run['id']}").json()["steps_done"] > 50, 240)
        pids = wait_for(_task_pids, 30)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        done = _ended(api, run["id"], 120)
        assert done["status"] == "failed" and "killed" in done["message"], done["message"]
        series = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()
        assert series["series"][0]["points_total"] > 50  # what it sent is kept
        # the server and the cluster go on: the next run trains
        again = api.post("/api/runs", json=tiny_run(steps=30)).json()
        assert _ended(api, again["id"])["status"] == "completed"


def test_an_unreachable_cluster_is_a_clear_error_not_a_hang(tmp_path, capsys):
    from bnscope.cli import main

    code = main(["serve", "--executor", "ray", "--ray-address", "127.0.0.1:1", "--port", "0",
                 "--data-dir", str(tmp_path)])  # fmt: skip
    assert code == 1
    assert "cannot reach the Ray cluster: nothing answers at 127.0.0.1:1" in capsys.readouterr().err

"""The server end to end, a real uvicorn on 127.0.0.1 and a real database: runs trained by real
workers from POST to export, live streaming, cancellation, workers that crash or are killed, a
server killed and restarted, the queue, and the sinks and client over real HTTP; every test runs
twice, on a SQLite file and on a real PostgreSQL (tests/postgres.py). The service's rules and
the API's answers are tested in-process: tests/server/test_service.py, tests/server/test_app.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import torch
from httpx_sse import connect_sse

from bncore.record.sinks import RUN_TOKEN_HEADER
from bnscope.process import ServerProcess, wait_for
from tests.conftest import database_url
from tests.helpers import FINAL, Touch, free_port, tiny_run, write_cifar

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(tmp_path_factory, request, backend):
    here = tmp_path_factory.mktemp("srv")
    env = {"BNSCOPE_MAX_BODY_BYTES": "300000", **on(database_url(request, backend, here))}
    srv = ServerProcess(here, "--max-runs", "2", env=env).start()
    yield srv
    srv.stop()


def on(url: str) -> dict[str, str]:
    """The environment that points a server at the database ``url``."""
    return {"BNSCOPE_DATABASE_URL": url}


@pytest.fixture
def db(db_url) -> dict[str, str]:
    """This test's fresh database (of the module's kind), as a server's environment."""
    return on(db_url)


@pytest.fixture
def api(server):
    with server.client() as c:
        yield c


def finished(api: httpx.Client, run_id: str, timeout: float = 120) -> dict:
    return wait_for(
        lambda: (r := api.get(f"/api/runs/{run_id}").json())["status"] in FINAL and r, timeout
    )


def events(client: httpx.Client, url: str, **kw: Any) -> Iterator[tuple[str, str, Any]]:
    """(event, id, data) of the server-sent events at ``url``, as they arrive (httpx-sse); the
    response's content type is checked first."""
    with connect_sse(client, "GET", url, **kw) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            if sse.data:  # a keep-alive comment dispatches no data
                yield sse.event, sse.id, sse.json()


def test_a_run_from_post_to_export(api):
    r = api.post("/api/runs", json=tiny_run(name="life"))
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] in ("queued", "running") and run["steps_total"] == 120
    assert run["links"]["metrics"] == f"/api/runs/{run['id']}/metrics"
    done = finished(api, run["id"])
    assert done["status"] == "completed", done
    assert done["steps_done"] == 120 and done["final"]["test_acc"] > 0.5
    assert done["meta"]["layers"] == ["block0", "block1"]

    layers = api.get(f"/api/runs/{run['id']}/layers").json()
    assert layers["layers"] == ["block0", "block1"] and "pre_var" in layers["stats"]["layer"]
    assert "loss" in layers["stats"]["global"] and layers["channel_steps"]

    m = api.get(
        f"/api/runs/{run['id']}/metrics", params={"stat": ["loss", "pre_var"], "max_points": 20}
    ).json()
    by = {(s["layer"], s["stat"]): s for s in m["series"]}
    loss = by[("", "loss")]
    assert loss["points_total"] == 120 and len(loss["steps"]) <= 20
    full = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()["series"][0]
    assert full["steps"] == list(range(1, 121))
    assert max(loss["values"]) == max(full["values"])  # the bucket extremes survive
    assert set(by) >= {("block0", "pre_var"), ("block1", "pre_var")}
    part = api.get(
        f"/api/runs/{run['id']}/metrics",
        params={"stat": "pre_var", "layer": "block1", "step_min": 50, "step_max": 60},
    ).json()["series"]
    assert len(part) == 1 and part[0]["steps"] == list(range(50, 61))

    ch = api.get(f"/api/runs/{run['id']}/channels").json()["layers"]
    assert [c["layer"] for c in ch] == ["block0", "block1"] and len(ch[0]["pre_var"]) == 16

    csv = api.get(f"/api/runs/{run['id']}/export", params={"table": "steps"})
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith('"step","loss"')
    assert len(csv.text.splitlines()) == 121
    pqt = api.get(f"/api/runs/{run['id']}/export", params={"format": "parquet"})
    table = pq.read_table(io.BytesIO(pqt.content))
    assert table.num_rows == 240 and "pre_var" in table.column_names

    listed = api.get("/api/runs", params={"status": "completed", "limit": 1}).json()
    assert listed["total"] >= 1 and len(listed["items"]) == 1
    assert api.delete(f"/api/runs/{run['id']}").status_code == 204
    assert api.get(f"/api/runs/{run['id']}").status_code == 404


def test_stream_is_live_and_resumes(api, server):
    run = api.post("/api/runs", json=tiny_run(steps=2000, eval_interval=500)).json()
    seqs = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for kind, ident, data in events(c, f"/api/runs/{run['id']}/stream"):
            if kind == "records":
                assert int(ident) == data["seq"]
                seqs.append(data["seq"])
                assert data["steps"]["step"] and data["layers"]["layer"]
                created = data["steps"]["time"][-1]
                assert time.time() - created < 5  # live, not replayed from long ago
            if len(seqs) == 3:
                break
    time.sleep(0.5)  # batches keep coming while nobody listens
    last = seqs[-1]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        after = {"Last-Event-ID": str(last)}
        for kind, _ident, data in events(c, f"/api/runs/{run['id']}/stream", headers=after):
            if kind == "records":
                seqs.append(data["seq"])
            assert kind != "reset"
            if kind == "status" and data["status"] in FINAL:
                break
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "every batch, once, in order"
    ended = api.get(f"/api/runs/{run['id']}").json()
    assert ended["status"] == "completed", ended["message"]


def test_cancel_stops_within_a_second(api):
    run = api.post(
        "/api/runs", json=tiny_run(steps=1_000_000, stats_interval=10, channel_interval=1000)
    ).json()
    wait_for(lambda: api.get(f"/api/runs/{run['id']}").json()["steps_done"] > 0)
    t0 = time.monotonic()
    r = api.post(f"/api/runs/{run['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert time.monotonic() - t0 < 2.5
    m = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()
    assert m["series"][0]["points_total"] > 0  # what it recorded is kept
    assert api.post(f"/api/runs/{run['id']}/cancel").status_code == 409


def test_a_dataset_under_the_data_root_trains(api, server):
    """(Paths outside the root are refused before anything is queued:
    tests/server/test_service.py.)"""
    root = server.data_dir / "datasets"  # the default: --data-dir's datasets/
    write_cifar(root / "tiny")
    # a dataset under the root trains, by its name or its full path
    for path in ("tiny", str(root / "tiny")):
        r = api.post("/api/runs", json=tiny_run(steps=10, data={"name": "cifar10", "path": path}))
        assert r.status_code == 201, r.text
        assert finished(api, r.json()["id"])["status"] == "completed"


def test_a_crafted_dataset_under_the_root_runs_no_code(api, server, tmp_path):
    marker = tmp_path / "pwned"
    folder = write_cifar(server.data_dir / "datasets" / "evil")
    (folder / "data_batch_1").write_bytes(pickle.dumps(Touch(marker)))
    r = api.post("/api/runs", json=tiny_run(data={"name": "cifar10", "path": "evil"}))
    assert r.status_code == 201, r.text
    done = finished(api, r.json()["id"])
    assert done["status"] == "failed" and "refused io.open" in done["message"], done
    assert not marker.exists()


def test_the_worker_refuses_a_path_outside_its_root_too(server, tmp_path):
    """Defence in depth: a worker told its data root checks data.path itself."""
    import threading

    from server import worker

    outside = write_cifar(tmp_path / "outside")
    with server.client() as c:
        run = c.post("/api/runs/client", json={"name": "w", "steps_total": 5}).json()
    config = json.dumps(tiny_run(data={"name": "cifar10", "path": str(outside)}))
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit):
        worker.main(run["id"], config, server.url, None, threads, threading.Event(),
                    str(tmp_path / "root"), run["write_token"])  # fmt: skip
    torch.set_num_threads(threads)
    with server.client() as c:
        done = c.get(f"/api/runs/{run['id']}").json()
    assert done["status"] == "failed" and "not a dataset directory under" in done["message"]


def test_a_sink_splits_what_it_has_waiting_into_posts_the_server_takes(api, server):
    """Flushes that pile up while a post is in flight go out together, but never in a body over
    the server's limit (300 kB here): the sink learns it from the 413 and splits."""
    import numpy as np

    from bncore.record.sinks import HttpSink
    from bncore.record.tables import Records

    run = api.post("/api/runs/client", json={"name": "big", "meta": {"layers": ["bn1"]}}).json()
    flushes = [
        Records(steps={"step": np.arange(i * 2000, (i + 1) * 2000),
                       "loss": np.random.default_rng(i).random(2000)})
        for i in range(12)
    ]  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as c:
        sink = HttpSink(c, run["id"], token=run["write_token"], max_body=10 * 2**20)
        for rec in flushes:  # about 45 kB each: all of them pile up behind the first post
            sink.write(rec)
        sink.drain()
        assert sink.max_body <= 300_000
        sink.abandon()
    s = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()["series"][0]
    assert s["points_total"] == 24_000


def training_pid(api: httpx.Client, run_id: str, after_steps: int) -> int:
    """The pid of the worker training ``run_id``, once it is past ``after_steps`` steps."""

    def pid() -> int | None:
        r = api.get(f"/api/runs/{run_id}").json()
        return r["pid"] if r["steps_done"] > after_steps else None

    return wait_for(pid, 60)


def test_a_killed_worker_fails_its_run_only(api):
    run = api.post(
        "/api/runs", json=tiny_run(steps=1_000_000, stats_interval=10, channel_interval=1000)
    ).json()
    pid = training_pid(api, run["id"], after_steps=0)
    os.kill(pid, signal.SIGKILL)
    failed = finished(api, run["id"], 10)
    assert failed["status"] == "failed" and "killed (signal 9)" in failed["message"]
    m = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()
    assert m["series"][0]["points_total"] > 0
    assert api.get("/healthz").json()["status"] == "ok"
    other = api.post("/api/runs", json=tiny_run(steps=20)).json()
    assert finished(api, other["id"])["status"] == "completed"


def test_a_worker_is_forked_from_a_process_that_had_imported_torch(api):
    """Its first step is not seconds of imports away (issue 28): the worker found torch and its
    own module imported by another process, the fork server (server.executors), and set its
    torch threads after the fork (2 cores, --max-runs 2: one each)."""
    run = api.post("/api/runs", json=tiny_run(steps=10)).json()
    done = finished(api, run["id"])
    assert done["status"] == "completed", done
    threads = max(1, (os.cpu_count() or 2) // 2)
    assert done["meta"]["worker"] == {"preloaded": True, "threads": threads}


def test_a_worker_started_by_spawn_imports_torch_itself(tmp_path):
    """--worker-start spawn (what every worker did before issue 28): a fresh interpreter each;
    the worker says so."""
    srv = ServerProcess(tmp_path, "--max-runs", "1", "--worker-start", "spawn").start()
    try:
        with srv.client() as api:
            run = api.post("/api/runs", json=tiny_run(steps=10)).json()
            done = finished(api, run["id"])
            assert done["status"] == "completed", done
            assert done["meta"]["worker"]["preloaded"] is False
    finally:
        srv.stop()


def test_runs_beyond_the_limit_queue_then_run(tmp_path, db):
    srv = ServerProcess(tmp_path, "--max-runs", "1", env=db).start()
    try:
        with srv.client() as api:
            first = api.post("/api/runs", json=tiny_run(steps=300)).json()
            second = api.post("/api/runs", json=tiny_run(steps=30)).json()
            wait_for(lambda: api.get(f"/api/runs/{first['id']}").json()["status"] == "running")
            waiting = api.get(f"/api/runs/{second['id']}").json()
            assert waiting["status"] == "queued" and waiting["queue_position"] == 0
            assert finished(api, first["id"])["status"] == "completed"
            assert finished(api, second["id"])["status"] == "completed"
    finally:
        srv.stop()


def test_a_hung_worker_is_killed_its_run_failed_and_its_slot_freed(tmp_path, db, record_property):
    """A worker that stops sending heartbeats (SIGSTOP: alive, silent) is killed after
    --worker-timeout; its run ends failed with its records, and the queued run starts (it
    stayed running forever, holding the only slot)."""
    srv = ServerProcess(tmp_path, "--max-runs", "1", "--worker-timeout", "3", env=db).start()
    try:
        with srv.client() as api:
            hung = api.post("/api/runs", json=tiny_run(steps=1_000_000, stats_interval=10)).json()
            pid = training_pid(api, hung["id"], after_steps=0)
            waiting = api.post("/api/runs", json=tiny_run(steps=20)).json()
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            failed = finished(api, hung["id"], 30)
            reaped = time.monotonic() - stopped
            record_property("reaped_s", round(reaped, 2))
            assert failed["status"] == "failed" and "no heartbeat for" in failed["message"]
            assert reaped < 3 + 5, reaped  # the timeout, and a second or two to notice
            wait_for(lambda: _gone(pid), 10, every=0.05)
            m = api.get(f"/api/runs/{hung['id']}/metrics", params={"stat": "loss"}).json()
            assert m["series"][0]["points_total"] > 0  # its records kept
            assert finished(api, waiting["id"])["status"] == "completed"  # the slot freed
    finally:
        srv.stop()


def test_a_worker_carries_the_servers_token(tmp_path, db):
    """(What the token guards: tests/server/test_app.py.)"""
    srv = ServerProcess(tmp_path, "--token", "s3cret", env=db).start()
    try:
        with srv.client() as api:
            ok = api.post(
                "/api/runs", json=tiny_run(steps=10), headers={"authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 201
            # the worker, which carries the token, gets its run done
            assert finished(api, ok.json()["id"])["status"] == "completed"
    finally:
        srv.stop()


def test_server_killed_mid_run_then_restarted(tmp_path, db):
    srv = ServerProcess(tmp_path, env=db).start()
    with srv.client() as api:
        run = api.post(
            "/api/runs", json=tiny_run(steps=1_000_000, stats_interval=5, channel_interval=1000)
        ).json()
        wait_for(lambda: api.get(f"/api/runs/{run['id']}").json()["steps_done"] > 100)
        acked = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()["series"][
            0
        ]["points_total"]
    srv.kill()
    srv = ServerProcess(tmp_path, env=db).start()
    try:
        with srv.client() as api:
            back = api.get(f"/api/runs/{run['id']}").json()
            assert back["status"] == "interrupted" and "acknowledged" in back["message"]
            loss = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()[
                "series"
            ][0]
            assert loss["points_total"] >= acked > 0
            assert loss["steps"][:5] == [1, 2, 3, 4, 5]
            fresh = api.post("/api/runs", json=tiny_run(steps=20)).json()
            assert finished(api, fresh["id"])["status"] == "completed"
    finally:
        srv.stop()


def test_a_scripts_run_survives_a_server_restart(tmp_path, db):
    """kill -9 of the server while a script logs, and the server started again on the same data
    directory and port: the run goes on when the script's records come back, every step is
    stored exactly once (those acknowledged before the kill are not sent twice), and it ends
    completed. A script that does not come back leaves its run interrupted (the test above)."""
    from bnscope.client import Client

    port = str(free_port())
    srv = ServerProcess(tmp_path, "--port", port, env=db).start()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    client = Client(srv.url)
    try:
        with client.create_run(name="restarted", flush_every=3) as run:
            run.watch(model)
            for step in range(1, 61):
                x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.log(step, loss)
                if step == 20:
                    run.flush()
                    run.sink.drain()  # steps 1-20 acknowledged
                    srv.kill()
                elif step == 40:  # steps 21-40 held back meanwhile
                    srv = ServerProcess(tmp_path, "--port", port, env=db).start()
        with srv.client() as api:
            done = api.get(f"/api/runs/{run.id}").json()
            assert done["status"] == "completed" and done["steps_done"] == 60, done
            for stat, layer in (("loss", None), ("pre_var", "1")):
                got = api.get(
                    f"/api/runs/{run.id}/metrics",
                    params={"stat": stat, **({"layer": layer} if layer else {})},
                ).json()
                assert got["series"][0]["steps"] == list(range(1, 61)), stat  # once each
    finally:
        client.close()
        srv.stop()


def test_a_full_disk_answers_507_naming_the_data_directory_and_the_server_goes_on(tmp_path):
    """The data directory on a small tmpfs, filled while a script posts records: the batch that
    does not fit is a 507 in the API's shape that names the directory, the server answers
    meanwhile, and once space is back the same batch is stored; nothing acknowledged is lost."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a small tmpfs for the data directory needs root to mount")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    srv = ServerProcess(disk / "data")
    try:
        srv.start()
        with srv.client() as api:
            run = api.post("/api/runs/client", json={"name": "full disk"}).json()
            auth = {RUN_TOKEN_HEADER: run["write_token"]}
            filler = disk / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            acked, refused = [], None
            for seq in range(1, 200):
                steps = list(range(500 * (seq - 1) + 1, 500 * seq + 1))
                body = {"seq": seq, "steps": {"step": steps, "loss": [1.0] * 500}}
                r = api.post(f"/api/runs/{run['id']}/records", json=body, headers=auth)
                if r.status_code != 200:
                    refused = (r, body)
                    break
                acked += steps
            assert refused is not None, "the disk never filled"
            r, body = refused
            assert r.status_code == 507, r.text
            message = r.json()["message"]
            assert "storage is full" in message and str(disk / "data") in message, message
            assert api.get("/healthz").status_code == 200  # it answers meanwhile
            filler.unlink()  # space is back
            r = api.post(f"/api/runs/{run['id']}/records", json=body, headers=auth)
            assert r.status_code == 200 and r.json()["stored"], r.text
            got = api.get(
                f"/api/runs/{run['id']}/metrics", params={"stat": "loss", "max_points": 100_000}
            ).json()
            assert got["series"][0]["steps"] == acked + body["steps"]["step"]
    finally:
        srv.stop()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_sweep_trains_one_run_per_point(api):
    """(What a sweep makes and refuses: tests/server/test_service.py.)"""
    body = {
        "name": "bn-vs-lr",
        "base": tiny_run(steps=15),
        "grid": {"norm.kind": ["batch", "none"], "optim.lr": [0.01, 0.1]},
    }
    r = api.post("/api/sweeps", json=body)
    assert r.status_code == 201, r.text
    sweep = r.json()
    labels = sorted(run["name"] for run in sweep["runs"])
    assert len(labels) == 4 and "bn-vs-lr: norm.kind=none, optim.lr=0.1" in labels
    for run in sweep["runs"]:
        assert finished(api, run["id"])["status"] == "completed"
    again = api.get(f"/api/sweeps/{sweep['id']}").json()
    assert {r["config"]["norm"]["kind"] for r in again["runs"]} == {"batch", "none"}


def test_worker_sink_sends_in_the_background_in_order_and_reports_a_lost_server(api, server):
    import numpy as np

    from bncore.record.sinks import HttpSink
    from bncore.record.tables import Records

    def rec(step: int) -> Records:
        return Records(
            steps={
                "step": np.array([step]),
                "loss": np.array([1.0 / step], np.float32),
                "lr": np.array([0.1]),
                "step_time": np.array([0.01]),
                "time": np.array([time.time()]),
            }
        )

    run = api.post("/api/runs/client", json={"name": "sink"}).json()
    run_id = run["id"]
    with httpx.Client(base_url=server.url) as http:
        sink = HttpSink(http, run_id, token=run["write_token"])
        for step in range(1, 201):  # far faster than one post each: batches coalesce
            sink.write(rec(step))
        sink.finish({"status": "completed", "steps_done": 200})
    assert sink.seq < 200
    series = api.get(f"/api/runs/{run_id}/metrics", params={"stat": "loss"}).json()["series"][0]
    assert series["steps"] == list(range(1, 201))
    assert api.get(f"/api/runs/{run_id}").json()["status"] == "completed"

    with httpx.Client(base_url=f"http://127.0.0.1:{free_port()}", timeout=2) as http:
        lost = HttpSink(http, "nobody", retries=1)
        lost.write(rec(1))
        with pytest.raises(RuntimeError, match="sending records failed"):
            lost.drain()
        with pytest.raises(RuntimeError, match="sending records failed"):
            lost.write(rec(2))


def test_client_streams_a_script_of_its_own(server):
    from bnscope.client import Client

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, output):  # what the layers saw, from the user's own hooks
        x = args[0].detach()
        seen["var"] = x.var(0, unbiased=False)
        seen["relu_var"] = torch.relu(output.detach()).var(0, unbiased=False)

    model[1].register_forward_hook(keep)
    client = Client(server.url)
    with client.create_run(name="my script", flush_every=7, measure_interval=1) as run:
        assert run.watch(model) is model and type(model[1]) is torch.nn.BatchNorm1d
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(1, 21):
            x, y = torch.randn(32, 8) * 3 + 1, torch.randint(0, 3, (32,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(step, loss, lr=0.1)
            bn = model[1]
            post_var = bn.weight.detach() ** 2 * seen["var"] / (seen["var"] + bn.eps)
    done = client.get_run(run.id)
    assert done["status"] == "completed" and done["steps_done"] == 20
    assert done["meta"]["layers"] == ["1"]
    with server.client() as api:
        stats = {"stat": ["pre_var", "act_var", "post_var"]}
        s = api.get(f"/api/runs/{run.id}/metrics", params=stats).json()
        pre, act, post = s["series"]
        assert pre["steps"] == list(range(1, 21))
        assert abs(pre["values"][-1] - seen["var"].mean().item()) < 1e-5
        assert abs(post["values"][-1] - post_var.mean().item()) < 1e-5  # gamma^2 var/(var+eps)
        assert abs(act["values"][-1] - seen["relu_var"].mean().item()) < 1e-5  # the ReLU after
        loss = api.get(f"/api/runs/{run.id}/metrics", params={"stat": "loss"}).json()
        assert loss["series"][0]["points_total"] == 20
    launched = client.launch(tiny_run(steps=10))
    assert launched["status"] in ("queued", "running")
    with pytest.raises(RuntimeError, match=r"optim\.lr"):
        client.launch({"optim": {"lr": -1}})
    client.close()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return True


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_worker_stops_within_2s_of_its_server_dying(tmp_path, record_property, db):
    srv = ServerProcess(tmp_path, env=db).start()
    try:
        with srv.client() as api:
            run = api.post(
                "/api/runs", json=tiny_run(steps=1_000_000, stats_interval=5, channel_interval=100)
            ).json()
            pid = training_pid(api, run["id"], after_steps=20)
            # a fork server's child: its parent is not the server, and outlives it
            assert api.get(f"/api/runs/{run['id']}").json()["meta"]["worker"]["preloaded"]
            assert _parent(pid) != srv.proc.pid
        srv.kill()  # kill -9: the worker is left training, its sends failing
        killed = time.monotonic()
        wait_for(lambda: _gone(pid), 15, every=0.05)
        took = time.monotonic() - killed
    finally:
        srv.kill()
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(pid, signal.SIGKILL)
    record_property("worker_stop_seconds", round(took, 2))
    print(f"the worker stopped {took:.2f} s after its server was killed")
    assert took < 4.0, f"the worker took {took:.2f} s to notice its server died"

"""The server against a real uvicorn on 127.0.0.1 and a real database: runs from POST to
records, live streaming, cancellation, crashes, restarts, tokens, the queue and sweeps; every
test runs twice, on a SQLite file and on a real PostgreSQL (tests/postgres.py)."""

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

from server import keys
from server.process import ServerProcess, wait_for
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


@pytest.mark.parametrize(
    "body,status,words",
    [
        ({"optim": {"lr": 0}}, 422, "optim.lr: Input should be greater than 0"),
        ({"model": {"depht": 3}}, 422, "model.depht: unknown field (check the spelling)"),
        ({"data": {"name": "mnist", "path": "/nonexistent"}}, 400, "not a dataset directory"),
        ({"steps": "many"}, 422, "steps: expected a number, not the string 'many'"),
        ({"batch_size": "64"}, 422, "batch_size: expected a number, not the string '64'"),
        # an int where a float goes is fine: validation passes, the data path is what fails
        ({"optim": {"lr": 1}, "data": {"name": "mnist", "path": "/no"}}, 400, "not a dataset"),
    ],
)
def test_bad_run_configs(api, body, status, words):
    r = api.post("/api/runs", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["message"]


def test_datasets_only_from_under_the_data_root(api, server, tmp_path):
    root = server.data_dir / "datasets"  # the default: --data-dir's datasets/
    write_cifar(root / "tiny")
    outside = write_cifar(tmp_path / "outside")  # a real dataset, but outside the root
    (root / "escape").symlink_to(outside)

    def refusal(path: str) -> str:
        r = api.post("/api/runs", json=tiny_run(data={"name": "cifar10", "path": path}))
        assert r.status_code == 400, (path, r.text)
        assert r.json()["detail"][0]["field"] == "data.path"
        return r.json()["message"].replace(repr(path), "PATH")

    refused = [str(outside), str(tmp_path), "../", "tiny/../..", "escape", "missing",
               str(root / "missing"), "/etc"]  # fmt: skip
    answers = {refusal(p) for p in refused}
    assert len(answers) == 1, answers  # existing-but-forbidden and missing answer alike
    assert str(root) in answers.pop()  # and say where datasets go
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


def test_cuda_where_there_is_none(api):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = api.post("/api/runs", json=tiny_run(device="cuda"))
    assert r.status_code == 400 and "no CUDA device" in r.json()["message"]
    assert r.json()["detail"][0]["field"] == "device"


def test_bad_requests(api):
    assert (
        api.post(
            "/api/runs", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    r = api.get("/api/runs/nope")
    assert r.status_code == 404 and "no run with id" in r.json()["message"]
    assert api.get("/api/nothing-here").status_code == 404
    run = api.post("/api/runs", json=tiny_run(steps=30)).json()
    done = finished(api, run["id"])
    rid = done["id"]
    for params, words in [
        ({"stat": "nope"}, "unknown stat 'nope'"),
        ({"stat": "pre_var", "layer": "block9"}, "unknown layer 'block9'"),
        ({"stat": "loss", "step_min": 9, "step_max": 3}, "is after"),
        ({"stat": "loss", "max_points": 1}, "greater than or equal to 2"),
    ]:
        r = api.get(f"/api/runs/{rid}/metrics", params=params)
        assert r.status_code in (400, 422) and words in r.text, (params, r.text)
    assert api.get(f"/api/runs/{rid}/metrics").status_code == 422  # stat is required
    assert api.get(f"/api/runs/{rid}/export", params={"format": "xls"}).status_code == 422
    assert api.get(f"/api/runs/{rid}/channels", params={"step": 7}).status_code == 404
    r = api.post(f"/api/runs/{rid}/records", json={"steps": {"step": [1], "loss": [1.0]}})
    assert r.status_code == 403 and keys.HEADER in r.text  # not its worker
    assert api.post(f"/api/runs/{rid}/cancel").status_code == 409
    big = api.post(
        "/api/runs", content=b" " * 400_000, headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and "larger than" in big.json()["message"]


def _one_shape(r: httpx.Response) -> dict[str, Any]:
    """Every 4xx: {"message": one line, "detail": [{"field", "message"}, ...]}."""
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"message", "detail"}, body
    assert isinstance(body["message"], str) and body["message"] and "\n" not in body["message"]
    assert isinstance(body["detail"], list) and body["detail"], body
    for e in body["detail"]:
        assert isinstance(e["field"], str) and isinstance(e["message"], str) and e["message"]
    return body


def test_every_refusal_has_one_shape(api):
    as_json = {"content-type": "application/json"}
    ghost = {"norm": {"kind": "ghost", "virtual_batch": 12}, "batch_size": 64}
    cases = [
        # (request, status, fields named in detail, words in message)
        (lambda: api.post("/api/runs", content=b'{"steps": 5}'), 422, [""], "Content-Type"),
        (lambda: api.post("/api/runs", json=[1, 2]), 422, [""], "as a JSON object"),
        (lambda: api.post("/api/runs"), 422, [""], "as a JSON object"),
        (lambda: api.post("/api/runs", content=b"{no", headers=as_json), 422, [""], "not valid"),
        (lambda: api.post("/api/runs", json={"batch_size": "64"}), 422, ["batch_size"], "'64'"),
        (
            lambda: api.post("/api/runs", json=ghost),
            422,
            ["norm.virtual_batch", "batch_size"],
            "norm.virtual_batch, batch_size: norm.virtual_batch=12 must divide batch_size=64",
        ),
        (
            lambda: api.post("/api/runs", json={"optim": {"lrr": 1}}),
            422,
            ["optim.lrr"],
            "optim.lrr: unknown field (check the spelling)",
        ),
        (
            lambda: api.post("/api/runs", json={"data": {"name": "mnist", "path": "/nope"}}),
            400,
            ["data.path"],
            "is not a dataset directory under this server's data root",
        ),
        (
            lambda: api.post("/api/sweeps", json={"grid": {"optim.lr": [-1]}, "nme": "x"}),
            422,
            ["nme"],
            "unknown field",
        ),
        (
            lambda: api.post("/api/sweeps", json={"base": ghost, "grid": {"seed": [1]}}),
            422,
            ["norm.virtual_batch", "batch_size"],
            "grid point seed=1: norm.virtual_batch, batch_size: ",
        ),
        (lambda: api.post("/api/sweeps", json={"base": {}}), 422, [""], "give either grid"),
        (
            lambda: api.post("/api/runs/client", json={"steps_total": "100"}),
            422,
            ["steps_total"],
            "expected a number, not the string '100'",
        ),
        (lambda: api.get("/api/runs/nope"), 404, [""], "no run with id 'nope'"),
        (lambda: api.get("/api/nothing-here"), 404, [""], "nothing at GET /api/nothing-here"),
        (lambda: api.delete("/api/runs"), 405, [""], "DELETE /api/runs is not allowed"),
        (lambda: api.get("/api/runs", params={"limit": 0}), 422, ["query.limit"], "limit"),
        (lambda: api.get("/api/experiments/nope"), 405, [""], "not allowed"),
        (lambda: api.post("/api/experiments/nope"), 404, [""], "no experiment 'nope'"),
        (
            lambda: api.post("/api/runs", content=b" " * 400_000, headers=as_json),
            413,
            [""],
            "larger than",
        ),
    ]
    for i, (send, status, fields, words) in enumerate(cases):
        r = send()
        assert r.status_code == status, (i, r.text)
        body = _one_shape(r)
        assert [e["field"] for e in body["detail"]] == fields, (i, body)
        assert words in body["message"], (i, body)
    assert api.get("/api/runs").json()["total"] >= 0  # still serving


def test_delete_is_refused_while_training(api):
    run = api.post(
        "/api/runs", json=tiny_run(steps=1_000_000, stats_interval=10, channel_interval=1000)
    ).json()
    r = api.delete(f"/api/runs/{run['id']}")
    assert r.status_code == 409 and "cancel it" in r.json()["message"]
    api.post(f"/api/runs/{run['id']}/cancel")
    # a worker still starting (importing torch) stops once it reaches its loop, which on a busy
    # machine can be after cancel has answered
    finished(api, run["id"], timeout=30)
    assert api.delete(f"/api/runs/{run['id']}").status_code == 204


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


def test_ingest_checks_batches(api):
    run = api.post("/api/runs/client", json={"name": "mine", "meta": {"layers": ["bn1"]}}).json()
    w = {keys.HEADER: run["write_token"]}  # the run's write token
    assert run["status"] == "running" and run["source"] == "client"
    url = f"/api/runs/{run['id']}/records"
    for body, words in [
        ({"steps": {"loss": [1.0]}}, "'step' column"),
        ({"steps": {"step": [1, 2], "loss": [1.0]}}, "as long as 'step'"),
        ({"layers": {"step": [1], "pre_var": [1.0]}}, "needs a 'layer' column"),
        ({"steps": {"step": [1], "loss": ["x"]}}, "could not convert"),
        ({"weights": {}}, "unknown keys"),
        ({"seq": -1}, "seq must be a positive integer"),
    ]:
        r = api.post(url, json=body, headers=w)
        assert r.status_code == 422 and words in r.json()["message"], (body, r.text)
    ok = api.post(url, json={"seq": 1, "steps": {"step": [1, 2], "loss": [2.0, None]}}, headers=w)
    assert ok.json() == {"seq": 1, "stored": True}
    again = api.post(
        url, json={"seq": 1, "steps": {"step": [1, 2], "loss": [2.0, None]}}, headers=w
    )
    assert again.json() == {"seq": 1, "stored": False}  # a retried send is not stored twice
    s = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()["series"][0]
    assert s["steps"] == [1, 2] and s["values"] == [2.0, None]
    done = api.post(f"/api/runs/{run['id']}/status", json={"status": "completed"}, headers=w).json()
    assert done["status"] == "completed"


def test_a_killed_worker_fails_its_run_only(api):
    run = api.post(
        "/api/runs", json=tiny_run(steps=1_000_000, stats_interval=10, channel_interval=1000)
    ).json()

    def worker_pid() -> int | None:
        r = api.get(f"/api/runs/{run['id']}").json()
        return r["pid"] if r["steps_done"] > 0 else None

    pid = wait_for(worker_pid, 60)
    os.kill(pid, signal.SIGKILL)
    failed = finished(api, run["id"], 10)
    assert failed["status"] == "failed" and "killed (signal 9)" in failed["message"]
    m = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()
    assert m["series"][0]["points_total"] > 0
    assert api.get("/healthz").json()["status"] == "ok"
    other = api.post("/api/runs", json=tiny_run(steps=20)).json()
    assert finished(api, other["id"])["status"] == "completed"


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


def test_token_guards_changes(tmp_path, db):
    srv = ServerProcess(tmp_path, "--token", "s3cret", env=db).start()
    try:
        with srv.client() as api:
            r = api.post("/api/runs", json=tiny_run(steps=10))
            assert r.status_code == 401 and "Bearer" in r.json()["message"]
            assert r.headers["www-authenticate"] == "Bearer"
            bad = api.post(
                "/api/runs", json=tiny_run(steps=10), headers={"authorization": "Bearer nope"}
            )
            assert bad.status_code == 401
            ok = api.post(
                "/api/runs", json=tiny_run(steps=10), headers={"authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 201
            assert api.get("/api/runs").status_code == 200  # reading needs no token
            # the worker, which carries the token, gets its run done
            assert finished(api, ok.json()["id"])["status"] == "completed"
    finally:
        srv.stop()


def test_protected_reads_need_the_token_the_browser_keeps_it_in_a_cookie(tmp_path):
    srv = ServerProcess(tmp_path, "--token", "s3cret", "--protect-reads").start()
    bearer = {"authorization": "Bearer s3cret"}
    try:
        with srv.client() as api:
            for path in ("/api/runs", "/api/experiments", "/openapi.json", "/dashboard/"):
                r = api.get(path)
                assert r.status_code == 401, (path, r.text)
                assert "protects reads" in r.json()["message"] and r.headers["www-authenticate"]
                assert api.get(path, headers=bearer).status_code == 200, path
            assert api.get("/healthz").status_code == 200  # liveness stays open
            assert api.get("/api/runs", headers={"authorization": "Bearer nope"}).status_code == 401
        with srv.client() as browser:
            opened = browser.get("/dashboard/", params={"token": "s3cret"})
            assert opened.status_code == 200 and "HttpOnly" in opened.headers["set-cookie"]
            assert browser.get("/api/runs").status_code == 200  # the cookie, from now on
            assert browser.get("/dashboard/").status_code == 200
            r = browser.post("/api/runs", json=tiny_run(steps=5))
            assert r.status_code == 401  # a cookie never authorizes a change
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


def test_sweep_makes_one_run_per_point(api):
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
    before = api.get("/api/runs").json()["total"]
    bad = api.post("/api/sweeps", json={"base": {}, "grid": {"optim.lr": [0.1, -1]}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["point"] == "optim.lr=-1"
    assert bad.json()["detail"][0]["field"] == "optim.lr"
    assert bad.json()["message"].startswith("grid point optim.lr=-1: optim.lr: Input should be")
    assert api.get("/api/runs").json()["total"] == before  # nothing queued


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


def test_records_of_a_bad_shape_are_refused_whole_and_the_run_stays_whole(api):
    from bncore.record.tables import CHANNEL_COLUMNS

    run = api.post("/api/runs/client", json={"name": "shapes", "meta": {"layers": ["bn"]}}).json()
    w = {keys.HEADER: run["write_token"]}  # the run's write token
    url = f"/api/runs/{run['id']}/records"

    def channels(step: int, c: int) -> dict[str, Any]:
        cols = {k: [[1.0] * c] for k in CHANNEL_COLUMNS}
        ch = {"step": [step], "layer": ["bn"], **cols}
        return {"steps": {"step": [step], "loss": [1.0]}, "channels": ch}

    assert api.post(url, json={"seq": 1, **channels(1, 3)}, headers=w).status_code == 200
    r = api.post(
        url, json={"seq": 2, **channels(2, 4)}, headers=w
    )  # the layer's channel count changes
    assert r.status_code == 422, r.text
    assert "'bn' has 3 channels in this run, this batch gives it 4" in r.json()["message"]
    too_many = {"step": [1], **{f"p15_{j}": [1.0] for j in range(200)}}
    for body, words in [
        ({"seq": 2**63, "steps": {"step": [2], "loss": [1.0]}}, "at most 2**62"),
        ({"seq": 2, "steps": {"step": [2**63], "loss": [1.0]}}, "integers from 0 to 2**62"),
        ({"seq": 2, "steps": {"step": [2**80], "loss": [1.0]}}, "integers from 0 to 2**62"),
        ({"seq": 2, "steps": {"step": [2.5], "loss": [1.0]}}, "integers from 0 to 2**62"),
        ({"seq": 2, "steps": {"step": [2], "made_up": [1.0]}}, "steps.made_up: unknown column"),
        ({"seq": 2, "steps": {"step": [2], "pre_var": [1.0]}}, "steps.pre_var: unknown column"),
        ({"seq": 2, "layers": too_many}, "layers has 201 columns; a table of a batch has at most"),
        ({"seq": 2, "steps": {"step": [2], "x" * 70: [1.0]}}, "1 to 64 letters"),
    ]:
        r = api.post(url, json=body, headers=w)
        assert r.status_code == 422 and words in r.json()["message"], (body, r.text[:300])
    plain = api.post(
        url,
        content=json.dumps({"seq": 2, "steps": {"step": [2], "loss": [1.0]}}),
        headers={"content-type": "text/plain", **w},
    )
    assert plain.status_code == 422 and "Content-Type: application/json" in plain.json()["message"]
    assert (
        api.post(url, json={"seq": 2, "steps": {"step": [2], "loss": [2.0]}}, headers=w).status_code
        == 200
    )
    # nothing refused was stored, and the run reads, ends and is deleted as any other
    got = api.get(f"/api/runs/{run['id']}")
    assert got.status_code == 200 and got.json()["steps_done"] == 2
    s = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()["series"][0]
    assert s["steps"] == [1, 2] and s["values"] == [1.0, 2.0]
    ch = api.get(f"/api/runs/{run['id']}/channels").json()["layers"]
    assert [len(c["pre_var"]) for c in ch] == [3]
    assert api.get(f"/api/runs/{run['id']}/layers").status_code == 200
    done = api.post(f"/api/runs/{run['id']}/status", json={"status": "completed"}, headers=w)
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert api.delete(f"/api/runs/{run['id']}").status_code == 204


def test_meta_too_deep_or_too_large_is_refused_before_anything_is_stored(api):
    def nested(levels: int) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for _ in range(levels - 1):
            meta = {"a": meta}
        return meta

    before = api.get("/api/runs").json()["total"]
    for meta, words in [
        (nested(300), "nests deeper than 32 levels"),
        ({"blob": "x" * 150_000}, "at most 100000 are kept"),
        ({"n": 2**80}, "cannot be kept"),
    ]:
        r = api.post("/api/runs/client", json={"name": "meta", "meta": meta})
        assert r.status_code == 422, r.text[:300]
        body = r.json()
        assert words in body["message"] and body["detail"][0]["field"] == "meta", body
    assert api.post("/api/runs/client", json={"meta": nested(32)}).status_code == 201
    assert api.get("/api/runs").json()["total"] == before + 1  # none of the refused
    run = api.post("/api/runs/client", json={"name": "status meta"}).json()
    w = {keys.HEADER: run["write_token"]}  # the run's write token
    for field in ("meta", "final"):
        r = api.post(
            f"/api/runs/{run['id']}/status",
            json={"status": "running", field: nested(40)},
            headers=w,
        )
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text[:300]
    assert api.get(f"/api/runs/{run['id']}").json()["meta"] == {"steps_total": None}
    page = api.get("/api/runs", params={"limit": 500})
    assert page.status_code == 200  # every listing still answers


def test_integers_beyond_what_the_database_holds_are_422(api):
    run = api.post("/api/runs/client", json={"name": "ints"}).json()
    w = {keys.HEADER: run["write_token"]}  # the run's write token
    rid = run["id"]
    limit = str(2**62)
    for send in [
        lambda: api.get("/api/runs", params={"offset": 2**63}),
        lambda: api.get(f"/api/runs/{rid}/channels", params={"step": 2**63}),
        lambda: api.get(f"/api/runs/{rid}/metrics", params={"stat": "loss", "step_min": 2**80}),
        lambda: api.get(f"/api/runs/{rid}/metrics", params={"stat": "loss", "step_max": 2**80}),
        lambda: api.post(
            f"/api/runs/{rid}/status", json={"status": "running", "steps_done": 2**63}, headers=w
        ),
    ]:
        r = send()
        assert r.status_code == 422 and limit in r.json()["message"], r.text[:300]
    assert api.get("/api/runs", params={"offset": 2**62}).json()["items"] == []
    assert api.get(f"/api/runs/{rid}").json()["status"] == "running"


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_worker_stops_within_2s_of_its_server_dying(tmp_path, record_property, db):
    srv = ServerProcess(tmp_path, env=db).start()
    try:
        with srv.client() as api:
            run = api.post(
                "/api/runs", json=tiny_run(steps=1_000_000, stats_interval=5, channel_interval=100)
            ).json()

            def training_pid() -> int | None:
                r = api.get(f"/api/runs/{run['id']}").json()
                return r["pid"] if r["steps_done"] > 20 else None

            pid = wait_for(training_pid, 60)
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


def test_only_whoever_created_a_run_writes_its_records_and_status(api):
    """Each run has a write token (its worker's, or the script's that registered it): without
    it nobody else can end it, fill it or stall it."""
    mine = api.post("/api/runs/client", json={"name": "mine"}).json()
    other = api.post("/api/runs/client", json={"name": "other"}).json()
    assert mine["write_token"] and mine["write_token"] != other["write_token"]
    assert api.get(f"/api/runs/{mine['id']}").json().get("write_token") is None  # given once
    url = f"/api/runs/{mine['id']}"
    batch = {"seq": 10**9, "steps": {"step": [1], "loss": [1.0]}}
    for headers in ({}, {keys.HEADER: other["write_token"]}, {keys.HEADER: "guess"}):
        for path, body in (("records", batch), ("status", {"status": "completed"})):
            r = api.post(f"{url}/{path}", json=body, headers=headers)
            assert r.status_code == 403, r.text
            assert keys.HEADER in r.json()["message"]
        assert api.post(f"{url}/heartbeat", headers=headers).status_code == 403
    assert api.get(url).json()["status"] == "running"
    assert api.get(url).json()["steps_done"] == 0  # nothing of theirs was stored
    w = {keys.HEADER: mine["write_token"]}
    plain = {"content-type": "text/plain", **w}  # as a cross-site form would send it
    r = api.post(f"{url}/status", content=b'{"status": "completed"}', headers=plain)
    assert r.status_code == 422 and "application/json" in r.json()["message"]
    ok = api.post(
        f"{url}/records", json={"seq": 1, "steps": {"step": [1], "loss": [1.0]}}, headers=w
    )
    assert ok.json() == {"seq": 1, "stored": True}

    # a queued run cannot be made to look started, and stays cancellable
    run = api.post("/api/runs", json=tiny_run(steps=100_000, stats_interval=50)).json()
    r = api.post(f"/api/runs/{run['id']}/status", json={"status": "running"})
    assert r.status_code == 403
    cancelled = api.post(f"/api/runs/{run['id']}/cancel").json()
    finished(api, run["id"], 30)
    assert cancelled["status"] in ("cancelled", "running", "queued")
    assert api.get(f"/api/runs/{run['id']}").json()["status"] == "cancelled"
    assert api.delete(f"/api/runs/{run['id']}").status_code == 204


def test_limits_on_what_one_request_can_make_the_server_do(tmp_path, db):
    """Each bound answers a 4xx naming it, before anything is queued or stored."""
    srv = ServerProcess(
        tmp_path, "--max-runs", "1", "--max-queued", "2", "--max-run-memory", "700MB",
        "--max-run-disk", "1MiB", env=db,
    ).start()  # fmt: skip
    try:
        with srv.client() as api:
            wide = tiny_run(model={"kind": "cnn", "width": 1024}, data={"name": "digits"})
            r = api.post("/api/runs", json=wide)
            assert r.status_code == 400, r.text
            said = r.json()["message"]
            assert "--max-run-memory" in said and "of memory" in said and "model.width" in said
            assert r.json()["detail"][0]["field"] == "model.width"
            r = api.post("/api/runs", json=tiny_run(steps=100_000, model={"depth": 8}))
            assert r.status_code == 400 and "--max-run-disk" in r.json()["message"], r.text
            assert r.json()["detail"][0]["field"] == "stats_interval"
            assert api.get("/api/runs").json()["total"] == 0  # none of them was stored

            # the queue: one training, two waiting, then 429 until there is room
            long = tiny_run(steps=100_000, stats_interval=100, channel_interval=100)
            ids = [api.post("/api/runs", json=long).json()["id"]]
            wait_for(lambda: api.get(f"/api/runs/{ids[0]}").json()["status"] == "running")
            ids += [api.post("/api/runs", json=long).json()["id"] for _ in range(2)]
            r = api.post("/api/runs", json=long)
            assert r.status_code == 429 and "--max-queued" in r.json()["message"], r.text
            sweep = {"base": long, "grid": {"optim.lr": [0.1, 0.2, 0.3]}}
            r = api.post("/api/sweeps", json=sweep)
            assert r.status_code == 429 and "3 more do not fit" in r.json()["message"], r.text
            for rid in ids:
                api.post(f"/api/runs/{rid}/cancel")

            # a script's run may keep at most --max-run-disk of records
            run = api.post("/api/runs/client", json={"name": "big"}).json()
            w = {keys.HEADER: run["write_token"]}
            steps = list(range(1, 20_001))
            first = {"seq": 1, "steps": {"step": steps, "loss": [0.5] * len(steps)}}
            assert api.post(f"/api/runs/{run['id']}/records", json=first, headers=w).is_success
            over = []
            for seq in range(2, 12):
                more = [s + 20_000 * (seq - 1) for s in steps]
                body = {"seq": seq, "steps": {"step": more, "loss": [0.5] * len(more)}}
                r = api.post(f"/api/runs/{run['id']}/records", json=body, headers=w)
                if r.status_code != 200:
                    over.append(r)
                    break
            assert over and over[0].status_code == 413, [r.status_code for r in over]
            assert "--max-run-disk" in over[0].json()["message"]
            kept = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()
            assert kept["series"][0]["points_total"] == 20_000 * (seq - 1)  # whole batches

            # a read's fan-out: repeated names count once, and the series it reads are bounded
            r = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": ["loss"] * 2000})
            assert r.status_code == 422 and "64" in r.json()["message"], r.text[:300]
            r = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": ["loss"] * 50})
            assert r.status_code == 200 and len(r.json()["series"]) == 1
            layers = [f"bn{i}" for i in range(600)]
            many = api.post("/api/runs/client", json={"meta": {"layers": layers}}).json()
            stats = ["pre_mean", "pre_var"]
            r = api.get(f"/api/runs/{many['id']}/metrics", params={"stat": stats})
            assert r.status_code == 400 and "at most 1024" in r.json()["message"], r.text[:300]
    finally:
        srv.stop()

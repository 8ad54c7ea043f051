"""The HTTP API (server.app) over an in-process service, through FastAPI's TestClient: what a
request is answered before or after the service has its say (validation, one shape for every
refusal, the body limit, the server's token, protected reads). No server process, no worker:
the app's lifespan does not run, so a run launched here stays queued. Each test runs on a
SQLite file and on a real PostgreSQL (tests/postgres.py); the service's own rules:
tests/server/test_service.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server import keys
from server.app import create_api
from server.service import Service
from server.settings import Settings
from tests.helpers import tiny_run


@pytest.fixture
def api(service: Callable[..., Service], http: Callable[[Service], TestClient]) -> TestClient:
    """As the server of tests/server/test_server.py: bodies up to 300 kB."""
    return http(service(max_runs=2, max_body_bytes=300_000))


def ended_run(api: TestClient) -> str:
    """A run that has ended, with records of two layers (a script's: no worker needed)."""
    run = api.post("/api/runs/client", json={"name": "ended", "meta": {"layers": ["block0",
                   "block1"]}}).json()  # fmt: skip
    w = {keys.HEADER: run["write_token"]}
    steps = list(range(1, 31))
    batch = {
        "seq": 1,
        "steps": {"step": steps, "loss": [1.0 / s for s in steps]},
        "layers": {"step": [s for s in steps for _ in range(2)],
                   "layer": ["block0", "block1"] * 30, "pre_var": [1.0] * 60},
    }  # fmt: skip
    assert api.post(f"/api/runs/{run['id']}/records", json=batch, headers=w).status_code == 200
    done = api.post(f"/api/runs/{run['id']}/status", json={"status": "completed"}, headers=w)
    assert done.json()["status"] == "completed"
    return run["id"]


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


def test_a_run_is_created_as_201_and_deleted_as_204(api):
    r = api.post("/api/runs", json=tiny_run(name="life"))
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] == "queued" and run["links"]["self"] == f"/api/runs/{run['id']}"
    assert api.get(f"/api/runs/{run['id']}").json()["queue_position"] == 0
    assert api.post(f"/api/runs/{run['id']}/cancel").json()["status"] == "cancelled"
    assert api.delete(f"/api/runs/{run['id']}").status_code == 204
    assert api.get(f"/api/runs/{run['id']}").status_code == 404


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
    rid = ended_run(api)
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
        (
            lambda: api.post("/api/runs", content=b'{"name": "\xff"}', headers=as_json),
            422,
            [""],
            "UTF-8",
        ),
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


def test_a_sweep_is_answered_with_its_runs_and_a_bad_point_beside_its_field(api):
    body = {"name": "bn-vs-lr", "base": tiny_run(steps=15),
            "grid": {"norm.kind": ["batch", "none"], "optim.lr": [0.01, 0.1]}}  # fmt: skip
    r = api.post("/api/sweeps", json=body)
    assert r.status_code == 201, r.text
    assert len(r.json()["runs"]) == 4
    before = api.get("/api/runs").json()["total"]
    bad = api.post("/api/sweeps", json={"base": {}, "grid": {"optim.lr": [0.1, -1]}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["point"] == "optim.lr=-1"
    assert bad.json()["detail"][0]["field"] == "optim.lr"
    assert bad.json()["message"].startswith("grid point optim.lr=-1: optim.lr: Input should be")
    unknown = api.post("/api/sweeps", json={"base": {"seed": 1}, "grid": {"seed.x": [1]}})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["field"] == "seed.x"
    assert api.get("/api/runs").json()["total"] == before  # nothing queued


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


def test_token_guards_changes(service, http):
    api = http(service(token="s3cret"))
    r = api.post("/api/runs", json=tiny_run(steps=10))
    assert r.status_code == 401 and "Bearer" in r.json()["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    bad = api.post("/api/runs", json=tiny_run(steps=10), headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401
    ok = api.post("/api/runs", json=tiny_run(steps=10), headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 201
    assert api.get("/api/runs").status_code == 200  # reading needs no token
    # (that the worker, which carries the token, gets its run done: tests/server/test_server.py)


def test_protected_reads_need_the_token_the_browser_keeps_it_in_a_cookie(tmp_path):
    from bnscope.app import create_app

    app = create_app(Settings(data_dir=tmp_path, token="s3cret", protect_reads=True))
    bearer = {"authorization": "Bearer s3cret"}
    try:
        api = TestClient(app, follow_redirects=False)
        for path in ("/api/runs", "/api/experiments", "/openapi.json", "/dashboard/"):
            r = api.get(path)
            assert r.status_code == 401, (path, r.text)
            assert "protects reads" in r.json()["message"] and r.headers["www-authenticate"]
            assert api.get(path, headers=bearer).status_code == 200, path
        assert api.get("/healthz").status_code == 200  # liveness stays open
        assert api.get("/api/runs", headers={"authorization": "Bearer nope"}).status_code == 401
        browser = TestClient(app, follow_redirects=False)
        opened = browser.get("/dashboard/", params={"token": "s3cret"})
        assert opened.status_code == 200 and "HttpOnly" in opened.headers["set-cookie"]
        assert browser.get("/api/runs").status_code == 200  # the cookie, from now on
        assert browser.get("/dashboard/").status_code == 200
        r = browser.post("/api/runs", json=tiny_run(steps=5))
        assert r.status_code == 401  # a cookie never authorizes a change
    finally:
        asyncio.run(app.state.service.stop())


def _unknown_keys(path: str, n: int) -> dict[str, Any]:
    """A body for ``path`` with ``n`` unknown keys, spread over nested objects where the body
    has them (a run config's groups), each object under the keys a body may have."""
    groups = ("model", "norm", "data", "optim", "distributed")
    spread = {g: {f"k{i}": 1 for i in range(n // len(groups))} for g in groups}
    return {
        "/api/runs": spread,
        "/api/runs/client": {"name": "x", "meta": {}, **{f"k{i}": 1 for i in range(n)}},
        "/api/sweeps": {"base": spread, "grid": {"seed": [1]}},
        "/api/experiments/bn-vs-learning-rate": {"overrides": {f"model.k{i}": 1 for i in range(n)}},
    }[path]


@pytest.mark.parametrize(
    "path", ["/api/runs", "/api/runs/client", "/api/sweeps", "/api/experiments/bn-vs-learning-rate"]
)
def test_a_refused_body_costs_time_linear_in_its_size(service, http, path):
    """A body of 10x the unknown keys takes at most about 10x the time to refuse (it took 40x,
    checking each key against a list of those seen: 2 s for 20,000 keys, the server frozen)."""
    import statistics
    import time

    api = http(service())

    def seconds(n: int) -> float:
        raw = json.dumps(_unknown_keys(path, n)).encode()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            r = api.post(path, content=raw, headers={"content-type": "application/json"})
            times.append(time.perf_counter() - start)
            assert r.status_code == 422, r.text[:300]
        return statistics.median(times)

    seconds(200)  # warm
    small, large = seconds(2_000), seconds(20_000)
    assert large / small < 20, (small, large)


def test_a_refusal_lists_20_errors_and_counts_the_rest(api):
    r = api.post("/api/runs", json={"model": {f"k{i}": 1 for i in range(100)}})
    body = _one_shape(r)
    assert len(body["detail"]) == 20 and "and 80 more errors" in body["message"], body


def test_bodies_beyond_what_a_call_reads_are_refused_saying_the_limit(service, http):
    api = http(service(max_config_bytes=10_000))
    r = api.post("/api/runs/client", json={f"k{i}": 1 for i in range(5_000)})
    assert r.status_code == 413 and "--max-config-bytes" in _one_shape(r)["message"]
    r = api.post("/api/runs/client", json={"meta": {"a": {f"k{i}": 1 for i in range(5_000)}}})
    assert r.status_code == 413  # the limit is the body's, however it nests
    api = http(service())
    r = api.post("/api/runs/client", json={"meta": {"a": {f"k{i}": 1 for i in range(5_000)}}})
    assert r.status_code == 422 and "at most 4096 are read" in _one_shape(r)["message"]


def test_health_answers_while_a_large_bad_body_is_refused(service):
    """The refusal is worked out off the event loop: /healthz (and every live stream) goes on
    being answered meanwhile."""
    import time

    app = create_api(service(), "http://testserver")
    raw = json.dumps(_unknown_keys("/api/runs", 20_000)).encode()

    async def both() -> tuple[float, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            # once first: what the process does on its first refusal only (imports, the
            # threadpool's start) is not what this measures (CI: the first database's run)
            await c.post("/api/runs", content=raw, headers={"content-type": "application/json"})
            start = time.perf_counter()

            async def refuse() -> float:
                r = await c.post(
                    "/api/runs", content=raw, headers={"content-type": "application/json"}
                )
                assert r.status_code == 422
                return time.perf_counter() - start

            post = asyncio.create_task(refuse())
            await asyncio.sleep(0.005)  # the post is under way (or the loop is held by it)
            assert (await c.get("/healthz")).status_code == 200
            return time.perf_counter() - start, await post

    health, refused = asyncio.run(both())
    assert health < 0.5 or health < refused, (health, refused)


@pytest.mark.parametrize(
    "meta,field",
    [
        ({"replicas": "abc"}, "meta.replicas"),
        ({"replicas": 1_000_000}, "meta.replicas"),
        ({"tracked_units": 5}, "meta.tracked_units"),
        ({"tracked_units": [[0, -1]]}, "meta.tracked_units.0.1"),
        ({"not_recorded": "x"}, "meta.not_recorded"),
        ({"layers": 5}, "meta.layers"),
        ({"layers": ["ok", 7]}, "meta.layers.1"),
        ({"channels": ["4"]}, "meta.channels.0"),
        ({"layer_kinds": {"a": 1}}, "meta.layer_kinds"),
        ({"steps_total": "many"}, "meta.steps_total"),
        ({"distributed": {"world": 0}}, "meta.distributed.world"),
    ],
)
def test_meta_keys_the_server_reads_are_checked_at_ingest(api, meta, field):
    before = api.get("/api/runs").json()["total"]
    r = api.post("/api/runs/client", json={"name": "bad meta", "meta": meta})
    body = _one_shape(r)
    assert r.status_code == 422 and body["detail"][0]["field"] == field, body
    assert "BN Scope reads this key" in body["message"] and field in body["message"]
    assert api.get("/api/runs").json()["total"] == before
    run = api.post("/api/runs/client", json={"name": "good", "meta": {"layers": ["a"]}}).json()
    w = {keys.HEADER: run["write_token"]}
    r = api.post(
        f"/api/runs/{run['id']}/status", json={"status": "running", "meta": meta}, headers=w
    )
    assert r.status_code == 422 and _one_shape(r)["detail"][0]["field"] == field
    assert api.get(f"/api/runs/{run['id']}").json()["meta"]["layers"] == ["a"]


def test_nul_in_any_text_is_refused_naming_where(api):
    """PostgreSQL's text cannot hold NUL (a 5xx there), SQLite stored it: a 422 on both."""
    run = api.post("/api/runs/client", json={"name": "nul"}).json()
    w = {keys.HEADER: run["write_token"]}
    for path, body, field, headers in [
        ("/api/runs/client", {"name": "a\x00b"}, "name", {}),
        ("/api/runs/client", {"meta": {"note": ["ok", "x\x00"]}}, "meta.note.1", {}),
        ("/api/runs/client", {"meta": {"k\x00": 1}}, "meta.k\x00", {}),
        ("/api/runs", {"name": "\x00"}, "name", {}),
        ("/api/sweeps", {"name": "s\x00", "grid": {"seed": [1]}}, "name", {}),
        (f"/api/runs/{run['id']}/status", {"status": "failed", "message": "\x00"}, "message", w),
    ]:
        r = api.post(path, json=body, headers=headers)
        assert r.status_code == 422, (path, r.text[:300])
        body = _one_shape(r)
        assert "NUL" in body["message"] and body["detail"][0]["field"] == field, body
    for path in ("/api/runs/a%00b", "/api/runs?sweep_id=%00", "/api/runs/x/metrics?stat=%00"):
        assert "NUL" in _one_shape(api.get(path))["message"], path
    assert api.get(f"/api/runs/{run['id']}").json()["status"] == "running"


def test_a_step_repeated_in_one_batch_is_refused(api):
    run = api.post("/api/runs/client", json={"name": "steps"}).json()
    w = {keys.HEADER: run["write_token"]}
    url = f"/api/runs/{run['id']}/records"
    for batch, words in [
        ({"steps": {"step": [7, 7, 7], "loss": [1.0, 2.0, 3.0]}}, "steps: step 7 is in 3 rows"),
        (
            {"layers": {"step": [1, 2, 1], "layer": ["a", "a", "a"], "pre_var": [1.0] * 3}},
            "layers: step 1 of layer 'a'",
        ),
        ({"evals": {"step": [5, 5], "test_acc": [0.1, 0.2]}}, "evals: step 5"),
    ]:
        r = api.post(url, json=batch, headers=w)
        assert r.status_code == 422 and words in _one_shape(r)["message"], r.text[:300]
    ok = {"layers": {"step": [1, 1, 2], "layer": ["a", "b", "a"], "pre_var": [1.0] * 3},
          "steps": {"step": [1, 2], "loss": [1.0, 0.5]}}  # fmt: skip
    assert api.post(url, json=ok, headers=w).status_code == 200
    m = api.get(f"/api/runs/{run['id']}/metrics", params={"stat": "loss"}).json()
    assert m["series"][0]["points_total"] == 2

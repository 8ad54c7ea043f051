"""The service's rules (server.service), called in-process: launching and validating runs, the
server's budgets and queue bound, sweeps and their typed errors, a script run's records (batch
checks, sequence numbers, write tokens), status changes, cancel and delete, and what reads
answer. Each test builds the service on its own fresh database, a SQLite file or a real
PostgreSQL (tests/postgres.py). No scheduler loop runs: a run launched here stays queued.

A refusal is asserted as the domain error the service raises; its ``status`` is the HTTP status
the API answers with (server.app, tests/server/test_app.py). What reads give back is compared as
the API sends it (:func:`wire`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from bncore.run.config import parse_config
from bnscope.process import wait_for
from server import keys
from server.errors import (
    BadRequest,
    Busy,
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    InvalidGridPoint,
    NotFound,
    NotRunnable,
    TooLarge,
    Unauthorized,
    UnknownSweepField,
)
from server.routes.deps import JSONResponse
from server.schemas import ClientRunCreate, StatusUpdate, SweepCreate
from server.service import Service
from tests.helpers import tiny_run, write_cifar


@pytest.fixture
def svc(service: Callable[..., Service]) -> Service:
    return service(max_body_bytes=300_000)


@contextlib.contextmanager
def refused(kind: type[DomainError], status: int, words: str = "") -> Iterator[Any]:
    """The block raises ``kind`` (answered over HTTP with ``status``), saying ``words``."""
    with pytest.raises(kind) as info:
        yield info
    assert info.value.status == status, info.value
    assert words in info.value.message, info.value.message


def wire(data: Any) -> Any:
    """A service's answer as the API sends it (numpy arrays as lists, NaN as null)."""
    return orjson.loads(JSONResponse(data).body)


def body(data: dict[str, Any]) -> bytes:
    """A batch as a script sends it (JSON; integers of any size, as Python writes them)."""
    return json.dumps(data).encode()


def client_run(svc: Service, **fields: Any) -> dict[str, Any]:
    """A script's run (bnscope.client), with its write token."""
    return svc.runs.create_client_run(ClientRunCreate(**fields))


def config(**over: Any):
    return parse_config(tiny_run(**over))


def total(svc: Service) -> int:
    return svc.runs.page(None, None, 50, 0)["total"]


def loss(svc: Service, run_id: str) -> dict[str, Any]:
    return wire(svc.records.metrics(run_id, ["loss"], None, None, None, 2000))["series"][0]


def test_each_refusal_is_answered_with_its_http_status():
    assert {k.__name__: k.status for k in (
        BadRequest, NotRunnable, Unauthorized, Forbidden, NotFound, Conflict, TooLarge,
        Busy, Invalid, UnknownSweepField, InvalidGridPoint)} == {
        "BadRequest": 400, "NotRunnable": 400, "Unauthorized": 401, "Forbidden": 403,
        "NotFound": 404, "Conflict": 409, "TooLarge": 413, "Busy": 429, "Invalid": 422,
        "UnknownSweepField": 422, "InvalidGridPoint": 422,
    }  # fmt: skip


def test_a_run_is_queued_listed_and_found(svc):
    run = svc.runs.create(config(name="life"))
    assert run["status"] == "queued" and run["steps_total"] == 120 and run["name"] == "life"
    assert run["queue_position"] == 0 and run["source"] == "server"
    assert run["links"]["metrics"] == f"/api/runs/{run['id']}/metrics"
    assert svc.runs.out(svc.runs.get(run["id"]))["queue_position"] == 0
    listed = svc.runs.page("queued", None, 1, 0)
    assert listed["total"] == 1 and [r["id"] for r in listed["items"]] == [run["id"]]
    assert svc.runs.page("completed", None, 50, 0)["total"] == 0
    with refused(NotFound, 404, "no run with id 'nope'"):
        svc.runs.get("nope")


def test_cuda_where_there_is_none(svc):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with refused(NotRunnable, 400, "no CUDA device") as info:
        svc.runs.create(config(device="cuda"))
    assert info.value.body()["detail"][0]["field"] == "device"


def test_datasets_only_from_under_the_data_root(svc, tmp_path):
    root = svc.settings.data_dir / "datasets"  # the default: --data-dir's datasets/
    write_cifar(root / "tiny")
    outside = write_cifar(tmp_path / "outside")  # a real dataset, but outside the root
    (root / "escape").symlink_to(outside)

    def refusal(path: str) -> str:
        with refused(NotRunnable, 400) as info:
            svc.runs.create(config(data={"name": "cifar10", "path": path}))
        assert info.value.body()["detail"][0]["field"] == "data.path", path
        return info.value.message.replace(repr(path), "PATH")

    refused_paths = [str(outside), str(tmp_path), "../", "tiny/../..", "escape", "missing",
                     str(root / "missing"), "/etc"]  # fmt: skip
    answers = {refusal(p) for p in refused_paths}
    assert len(answers) == 1, answers  # existing-but-forbidden and missing answer alike
    assert str(root) in answers.pop()  # and say where datasets go
    assert total(svc) == 0
    # a dataset under the root is queued, by its name or its full path (that it trains:
    # tests/server/test_server.py)
    for path in ("tiny", str(root / "tiny")):
        run = svc.runs.create(config(steps=10, data={"name": "cifar10", "path": path}))
        assert run["status"] == "queued"


def test_status_moves_forward_only(svc):
    """A script's run starts running and ends once; a server's run ends when cancelled; nothing
    that has ended takes a report, a record or a cancel."""
    run = client_run(svc, name="mine", steps_total=10)
    w, rid = run["write_token"], run["id"]
    assert run["status"] == "running" and run["steps_total"] == 10
    assert run["heartbeat_s"] == svc.settings.client_timeout / 4
    assert not {"write_token", "write_key"} & set(svc.runs.out(svc.runs.get(rid)))  # given once
    meta = {"layers": ["bn"], "note": "hello"}
    started = svc.runs.report_status(rid, StatusUpdate(status="running", meta=meta), w)
    assert started["status"] == "running"
    assert started["meta"] == {**meta, "steps_total": 10}  # what it registered is kept
    assert started["started_at"] is not None
    done = svc.runs.report_status(
        rid, StatusUpdate(status="failed", message="boom", traceback="Traceback: ..."), w
    )
    assert done["status"] == "failed" and done["message"] == "boom\nTraceback: ..."
    assert done["finished_at"] is not None
    for again in (
        lambda: svc.runs.report_status(rid, StatusUpdate(status="completed"), w),
        lambda: svc.runs.heartbeat(rid, w),
        lambda: svc.runs.cancel(rid),
    ):
        with refused(Conflict, 409, "has already ended (failed)"):
            again()
    with refused(Conflict, 409, "takes records only while running"):
        svc.runs.ingest(rid, body({"seq": 1, "steps": {"step": [1], "loss": [1.0]}}), w)
    assert svc.runs.get(rid)["status"] == "failed"

    queued = svc.runs.create(config(steps=100_000))
    svc.runs.cancel(queued["id"])  # before it started: at once
    cancelled = svc.runs.out(svc.runs.get(queued["id"]))
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
    assert cancelled["message"] == "cancelled before it started"
    script = client_run(svc, name="cancelled")
    svc.runs.cancel(script["id"])
    assert svc.runs.get(script["id"])["status"] == "cancelled"
    with refused(NotFound, 404, "no run with id 'nope'"):
        svc.runs.cancel("nope")


def test_a_queued_run_says_whether_it_waits_for_the_workers_or_a_free_one(svc):
    """The server's first seconds: its fork server imports torch before any launch (server.
    executors), and a run queued meanwhile says so (the dashboard tells the user the workers
    are starting, not that one is busy); once they are ready, it waits for a free worker."""
    run = svc.runs.create(config(name="first"))
    assert run["queued_for"] == "slot"  # no executor prepared here: launches could go
    executor = svc.scheduler.executor
    executor.prepare()  # a real fork server importing torch: seconds
    try:
        assert svc.runs.out(svc.runs.get(run["id"]))["queued_for"] == "workers"
        wait_for(executor.ready, 150)
        assert svc.runs.out(svc.runs.get(run["id"]))["queued_for"] == "slot"
    finally:
        executor.close()
    svc.runs.cancel(run["id"])
    assert svc.runs.out(svc.runs.get(run["id"]))["queued_for"] is None


def test_the_workers_warm_up_builds_the_fused_kernel_on_a_new_machine(
    svc, backend, tmp_path, monkeypatch
):
    """On a machine with no fused kernel built (a fresh cache), the first run does not wait in
    its own worker for the 30 s build, its banner saying the worker had started: the fork
    server's first child builds it while the server's workers are starting, and runs queued
    meanwhile say so."""
    from bncore.nn.kernels import cpu

    if backend != "sqlite":
        pytest.skip("the build is the same whatever the database: built once, on SQLite")
    if cpu._compiler() is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built")
    kernels = tmp_path / "kernels"
    monkeypatch.setenv("BNCORE_CACHE_DIR", str(kernels))  # the fork server starts with it
    run = svc.runs.create(config(name="first"))
    executor = svc.scheduler.executor
    executor.prepare()
    try:
        assert svc.runs.out(svc.runs.get(run["id"]))["queued_for"] == "workers"
        wait_for(executor.ready, 240)
        built = list(kernels.glob("bn_cpu-*.so"))
        assert len(built) == 1, sorted(p.name for p in kernels.iterdir())
    finally:
        executor.close()
    svc.runs.cancel(run["id"])


def test_delete_is_refused_while_queued_or_running(svc):
    queued = svc.runs.create(config(steps=1_000_000, stats_interval=10, channel_interval=1000))
    running = client_run(svc, name="running")
    for run in (queued, running):
        with refused(Conflict, 409, "cancel it"):
            svc.runs.delete(run["id"])
        svc.runs.cancel(run["id"])
        assert svc.runs.get(run["id"])["status"] == "cancelled"
        svc.runs.delete(run["id"])
        with refused(NotFound, 404):
            svc.runs.get(run["id"])
    assert total(svc) == 0
    with refused(NotFound, 404):
        svc.runs.delete("nope")


def test_ingest_checks_batches(svc):
    run = client_run(svc, name="mine", meta={"layers": ["bn1"]})
    w = run["write_token"]  # the run's write token
    assert run["status"] == "running" and run["source"] == "client"
    for batch, words in [
        ({"steps": {"loss": [1.0]}}, "'step' column"),
        ({"steps": {"step": [1, 2], "loss": [1.0]}}, "as long as 'step'"),
        ({"layers": {"step": [1], "pre_var": [1.0]}}, "needs a 'layer' column"),
        ({"steps": {"step": [1], "loss": ["x"]}}, "could not convert"),
        ({"weights": {}}, "unknown keys"),
        ({"seq": -1}, "seq must be a positive integer"),
    ]:
        with refused(Invalid, 422, words):
            svc.runs.ingest(run["id"], body(batch), w)
    ok = svc.runs.ingest(
        run["id"], body({"seq": 1, "steps": {"step": [1, 2], "loss": [2.0, None]}}), w
    )
    assert ok == {"seq": 1, "stored": True}
    again = svc.runs.ingest(
        run["id"], body({"seq": 1, "steps": {"step": [1, 2], "loss": [2.0, None]}}), w
    )
    assert again == {"seq": 1, "stored": False}  # a retried send is not stored twice
    s = loss(svc, run["id"])
    assert s["steps"] == [1, 2] and s["values"] == [2.0, None]
    done = svc.runs.report_status(run["id"], StatusUpdate(status="completed"), w)
    assert done["status"] == "completed"


def test_a_listener_gets_what_it_missed_then_each_batch_until_the_run_ends(svc):
    """What GET /stream sends (the route only encodes it): after Last-Event-ID the kept batches
    it missed, the run's status, then each batch as it is stored, until the final status; a
    ``reset`` first when what it missed is no longer kept. (Over HTTP, from a training worker:
    tests/server/test_server.py.)"""
    run = client_run(svc, name="live", meta={"layers": ["bn"]})
    w, rid = run["write_token"], run["id"]

    def send(step: int) -> None:
        svc.runs.ingest(rid, body({"seq": step, "steps": {"step": [step], "loss": [1.0]}}), w)

    async def listen() -> None:
        for step in (1, 2, 3):
            send(step)
        events = svc.runs.follow(rid, 1)
        got = [await anext(events) for _ in range(3)]
        assert [(e.kind, e.seq) for e in got] == [("records", 2), ("records", 3), ("status", 3)]
        assert wire(got[0].data)["steps"]["step"] == [2] and got[2].data["status"] == "running"
        send(4)
        live = await anext(events)
        assert (live.kind, live.seq) == ("records", 4) and wire(live.data)["seq"] == 4
        svc.runs.report_status(rid, StatusUpdate(status="completed"), w)
        end = await anext(events)
        assert end.kind == "status" and end.data["status"] == "completed"
        with pytest.raises(StopAsyncIteration):
            await anext(events)
        # once the run has ended its batches are no longer kept: a listener resuming is told so
        assert [e.kind async for e in svc.runs.follow(rid, 2)] == ["reset", "status"]
        assert [e.kind async for e in svc.runs.follow(rid, None)] == ["status"]
        with refused(NotFound, 404):
            await anext(svc.runs.follow("nope", None))

    asyncio.run(listen())


def test_records_of_a_bad_shape_are_refused_whole_and_the_run_stays_whole(svc, http):
    from bncore.record.tables import CHANNEL_COLUMNS

    run = client_run(svc, name="shapes", meta={"layers": ["bn"]})
    w, rid = run["write_token"], run["id"]  # the run's write token

    def channels(step: int, c: int) -> dict[str, Any]:
        cols = {k: [[1.0] * c] for k in CHANNEL_COLUMNS}
        ch = {"step": [step], "layer": ["bn"], **cols}
        return {"steps": {"step": [step], "loss": [1.0]}, "channels": ch}

    assert svc.runs.ingest(rid, body({"seq": 1, **channels(1, 3)}), w)["stored"]
    # the layer's channel count changes
    with refused(Invalid, 422, "'bn' has 3 channels in this run, this batch gives it 4"):
        svc.runs.ingest(rid, body({"seq": 2, **channels(2, 4)}), w)
    too_many = {"step": [1], **{f"p15_{j}": [1.0] for j in range(200)}}
    for batch, words in [
        ({"seq": 2**63, "steps": {"step": [2], "loss": [1.0]}}, "at most 2**62"),
        ({"seq": 2, "steps": {"step": [2**63], "loss": [1.0]}}, "integers from 0 to 2**62"),
        ({"seq": 2, "steps": {"step": [2**80], "loss": [1.0]}}, "integers from 0 to 2**62"),
        ({"seq": 2, "steps": {"step": [2.5], "loss": [1.0]}}, "integers from 0 to 2**62"),
        ({"seq": 2, "steps": {"step": [2], "made_up": [1.0]}}, "steps.made_up: unknown column"),
        ({"seq": 2, "steps": {"step": [2], "pre_var": [1.0]}}, "steps.pre_var: unknown column"),
        ({"seq": 2, "layers": too_many}, "layers has 201 columns; a table of a batch has at most"),
        ({"seq": 2, "steps": {"step": [2], "x" * 70: [1.0]}}, "1 to 64 letters"),
    ]:
        with refused(Invalid, 422, words):
            svc.runs.ingest(rid, body(batch), w)
    # records come as JSON: the route refuses another content type before the service sees it
    plain = http(svc).post(
        f"/api/runs/{rid}/records",
        content=body({"seq": 2, "steps": {"step": [2], "loss": [1.0]}}),
        headers={"content-type": "text/plain", keys.HEADER: w},
    )
    assert plain.status_code == 422 and "Content-Type: application/json" in plain.json()["message"]
    assert svc.runs.ingest(rid, body({"seq": 2, "steps": {"step": [2], "loss": [2.0]}}), w)
    # nothing refused was stored, and the run reads, ends and is deleted as any other
    assert svc.runs.get(rid)["steps_done"] == 2
    s = loss(svc, rid)
    assert s["steps"] == [1, 2] and s["values"] == [1.0, 2.0]
    ch = wire(svc.records.channels(rid, None))["layers"]
    assert [len(c["pre_var"]) for c in ch] == [3]
    assert svc.records.layers(rid)["layers"] == ["bn"]
    done = svc.runs.report_status(rid, StatusUpdate(status="completed"), w)
    assert done["status"] == "completed"
    svc.runs.delete(rid)


def test_any_module_path_torch_accepts_is_a_layer_name(svc, http):
    """Layers are named as torch names modules (torchvision's regnet: ``block1-0``; a user's
    ModuleDict keys: spaces, slashes, any script): stored, read and exported as they are, a
    spreadsheet formula neutralised in CSV; a control character or a name over 512 is refused,
    saying why, and the run keeps what it had."""
    run = client_run(svc, name="names")
    rid, w = run["id"], run["write_token"]
    names = ["trunk_output.block1.block1-0.f.a.1", "enc/conv 1.bn", "卷积.归一化",
             "=HYPERLINK(\"http://x\")", "-1", "x" * 512]  # fmt: skip
    layers = {"step": [1] * len(names), "layer": names, "pre_var": [1.0] * len(names)}
    assert svc.runs.ingest(rid, body({"seq": 1, "steps": {"step": [1]}, "layers": layers}), w)
    assert sorted(svc.records.layers(rid)["layers"]) == sorted(names)
    for bad, words in [("a\x00b", "without control characters"), ("y" * 513, "1 to 512"),
                       ("", "1 to 512")]:  # fmt: skip
        one = {"step": [2], "layer": [bad], "pre_var": [1.0]}
        with refused(Invalid, 422, words):
            svc.runs.ingest(rid, body({"seq": 2, "steps": {"step": [2]}, "layers": one}), w)
    assert svc.runs.get(rid)["steps_done"] == 1
    got = http(svc).get(f"/api/runs/{rid}/export", params={"table": "layers"})
    cells = {line.split(",")[1].strip('"') for line in got.text.splitlines()[1:]}
    assert '\'=HYPERLINK(""http://x"")' in cells and "'-1" in cells, cells
    assert {"trunk_output.block1.block1-0.f.a.1", "enc/conv 1.bn", "卷积.归一化"} <= cells
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells)


def test_only_whoever_created_a_run_writes_its_records_and_status(svc, http):
    """Each run has a write token (its worker's, or the script's that registered it): without
    it nobody else can end it, fill it or stall it."""
    mine = client_run(svc, name="mine")
    other = client_run(svc, name="other")
    assert mine["write_token"] and mine["write_token"] != other["write_token"]
    rid = mine["id"]
    assert svc.runs.out(svc.runs.get(rid)).get("write_token") is None  # given once
    batch = body({"seq": 10**9, "steps": {"step": [1], "loss": [1.0]}})
    for token in (None, other["write_token"], "guess"):
        for write in (
            lambda t: svc.runs.ingest(rid, batch, t),
            lambda t: svc.runs.report_status(rid, StatusUpdate(status="completed"), t),
            lambda t: svc.runs.heartbeat(rid, t),
        ):
            with refused(Forbidden, 403, keys.HEADER):
                write(token)
    assert svc.runs.get(rid)["status"] == "running"
    assert svc.runs.get(rid)["steps_done"] == 0  # nothing of theirs was stored
    w = {keys.HEADER: mine["write_token"]}
    plain = {"content-type": "text/plain", **w}  # as a cross-site form would send it
    r = http(svc).post(f"/api/runs/{rid}/status", content=b'{"status": "completed"}', headers=plain)
    assert r.status_code == 422 and "application/json" in r.json()["message"]
    ok = svc.runs.ingest(
        rid, body({"seq": 1, "steps": {"step": [1], "loss": [1.0]}}), mine["write_token"]
    )
    assert ok == {"seq": 1, "stored": True}

    # a queued run cannot be made to look started, and stays cancellable
    run = svc.runs.create(config(steps=100_000, stats_interval=50))
    with refused(Forbidden, 403):
        svc.runs.report_status(run["id"], StatusUpdate(status="running"), None)
    svc.runs.cancel(run["id"])
    assert svc.runs.get(run["id"])["status"] == "cancelled"
    svc.runs.delete(run["id"])


def test_limits_on_what_one_request_can_make_the_server_do(service, http):
    """Each bound answers a 4xx naming it, before anything is queued or stored."""
    svc = service(max_runs=1, max_queued=2, max_run_memory=700 * 10**6, max_run_disk=2**20)
    wide = tiny_run(model={"kind": "cnn", "width": 1024}, data={"name": "digits"})
    with refused(NotRunnable, 400) as info:
        svc.runs.create(parse_config(wide))
    said = info.value.message
    assert "--max-run-memory" in said and "of memory" in said and "model.width" in said
    assert info.value.body()["detail"][0]["field"] == "model.width"
    with refused(NotRunnable, 400, "--max-run-disk") as info:
        svc.runs.create(config(steps=100_000, model={"depth": 8}))
    assert info.value.body()["detail"][0]["field"] == "stats_interval"
    assert total(svc) == 0  # none of them was stored

    # the queue: two waiting (no scheduler runs here, so none of them starts), then 429 until
    # there is room
    long = tiny_run(steps=100_000, stats_interval=100, channel_interval=100)
    ids = [svc.runs.create(parse_config(long))["id"] for _ in range(2)]
    with refused(Busy, 429, "--max-queued"):
        svc.runs.create(parse_config(long))
    sweep = SweepCreate(base=long, grid={"optim.lr": [0.1, 0.2, 0.3]})
    with refused(Busy, 429, "3 more do not fit"):
        svc.sweeps.create(sweep)
    assert total(svc) == 2
    for rid in ids:
        svc.runs.cancel(rid)
    assert svc.runs.create(parse_config(long))["status"] == "queued"  # room again

    # a script's run may keep at most --max-run-disk of records
    run = client_run(svc, name="big")
    w = run["write_token"]
    steps = list(range(1, 20_001))
    first = {"seq": 1, "steps": {"step": steps, "loss": [0.5] * len(steps)}}
    assert svc.runs.ingest(run["id"], body(first), w)["stored"]
    over = []
    for seq in range(2, 12):
        more = [s + 20_000 * (seq - 1) for s in steps]
        batch = {"seq": seq, "steps": {"step": more, "loss": [0.5] * len(more)}}
        try:
            svc.runs.ingest(run["id"], body(batch), w)
        except DomainError as exc:
            over.append(exc)
            break
    assert over and isinstance(over[0], TooLarge) and over[0].status == 413, over
    assert "--max-run-disk" in over[0].message
    assert loss(svc, run["id"])["points_total"] == 20_000 * (seq - 1)  # whole batches

    # a read's fan-out: repeated names count once, and the series it reads are bounded
    r = http(svc).get(f"/api/runs/{run['id']}/metrics", params={"stat": ["loss"] * 2000})
    assert r.status_code == 422 and "64" in r.json()["message"], r.text[:300]
    read = svc.records.metrics(run["id"], ["loss"] * 50, None, None, None, 2000)
    assert len(read["series"]) == 1
    many = client_run(svc, meta={"layers": [f"bn{i}" for i in range(600)]})
    with refused(BadRequest, 400, "at most 1024"):
        svc.records.metrics(many["id"], ["pre_mean", "pre_var"], None, None, None, 2000)


def test_metrics_reads_and_their_bounds(svc):
    run = client_run(svc, name="reads", meta={"layers": ["block0", "block1"]})
    w, rid = run["write_token"], run["id"]
    steps = list(range(1, 121))
    layers = {
        "step": [s for s in steps for _ in range(2)],
        "layer": ["block0", "block1"] * len(steps),
        "pre_var": [float(s % 7) for s in steps for _ in range(2)],
    }
    loss_values = [1.0 / s for s in steps]
    loss_values[57] = 5.0  # an outlier inside a bucket
    svc.runs.ingest(rid, body({"seq": 1, "steps": {"step": steps, "loss": loss_values},
                               "layers": layers}), w)  # fmt: skip
    m = wire(svc.records.metrics(rid, ["loss", "pre_var"], None, None, None, 20))
    by = {(s["layer"], s["stat"]): s for s in m["series"]}
    assert set(by) == {("", "loss"), ("block0", "pre_var"), ("block1", "pre_var")}
    short = by[("", "loss")]
    assert short["points_total"] == 120 and len(short["steps"]) <= 20
    assert max(short["values"]) == 5.0  # the bucket extremes survive
    full = loss(svc, rid)
    assert full["steps"] == steps
    part = wire(svc.records.metrics(rid, ["pre_var"], ["block1"], 50, 60, 2000))["series"]
    assert len(part) == 1 and part[0]["steps"] == list(range(50, 61))
    for args, words in [
        ((["nope"], None, None, None), "unknown stat 'nope'"),
        ((["pre_var"], ["block9"], None, None), "unknown layer 'block9'"),
        ((["loss"], None, 9, 3), "is after"),
    ]:
        with refused(BadRequest, 400, words):
            svc.records.metrics(rid, *args, 2000)
    with refused(NotFound, 404, "no per-channel arrays at step 7"):
        svc.records.channels(rid, 7)
    with refused(NotFound, 404, "no run with id 'nope'"):
        svc.records.metrics("nope", ["loss"], None, None, None, 2000)


def test_sweep_makes_one_run_per_point(svc):
    body = SweepCreate(
        name="bn-vs-lr",
        base=tiny_run(steps=15),
        grid={"norm.kind": ["batch", "none"], "optim.lr": [0.01, 0.1]},
    )
    sweep = svc.sweeps.create(body)
    labels = sorted(run["name"] for run in sweep["runs"])
    assert len(labels) == 4 and "bn-vs-lr: norm.kind=none, optim.lr=0.1" in labels
    assert {run["status"] for run in sweep["runs"]} == {"queued"}  # (trained: test_server.py)
    again = svc.sweeps.get(sweep["id"])
    assert {r["config"]["norm"]["kind"] for r in again["runs"]} == {"batch", "none"}
    before = total(svc)
    with refused(InvalidGridPoint, 422) as info:
        svc.sweeps.create(SweepCreate(base={}, grid={"optim.lr": [0.1, -1]}))
    detail = info.value.body()["detail"]
    assert detail[0]["point"] == "optim.lr=-1" and detail[0]["field"] == "optim.lr"
    assert info.value.message.startswith("grid point optim.lr=-1: optim.lr: Input should be")
    assert info.value.point == "optim.lr=-1" and info.value.field_errors[0][0] == "optim.lr"
    # a key that no config can hold is typed apart, with the key as its field
    with refused(UnknownSweepField, 422, "sweep key 'steps.x'") as info:
        svc.sweeps.create(SweepCreate(base=tiny_run(), grid={"steps.x": [1, 2]}))
    assert info.value.field == "steps.x"
    for bad, words in [
        (SweepCreate(base={}), "give either grid"),
        (SweepCreate(grid={"seed": [1]}, points=[{"seed": 2}]), "give either grid"),
        (SweepCreate(grid={"seed": []}), "at least one value"),
        (SweepCreate(grid={"seed": list(range(257))}), "the sweep has 257 points; at most 256"),
    ]:
        with refused(Invalid, 422, words):
            svc.sweeps.create(bad)
    assert total(svc) == before  # nothing queued
    with refused(NotFound, 404, "no sweep with id 'nope'"):
        svc.sweeps.get("nope")


# -- the BN doctor on ingest (issue 26) ------------------------------------------------------


def bn_batch(seq: int, steps: list[int], nan: dict[str, int] | None = None) -> bytes:
    """A script's batch: the loss (finite throughout) and two BN layers' running statistics,
    the running mean of each layer in ``nan`` NaN from that step on."""
    layers = ["bn1", "bn2"]
    nan = nan or {}
    rows = [(s, lay) for s in steps for lay in layers]
    mean = [None if lay in nan and s >= nan[lay] else 0.1 for s, lay in rows]
    return body({
        "seq": seq,
        "steps": {"step": steps, "loss": [1.0] * len(steps)},
        "layers": {"step": [s for s, _ in rows], "layer": [lay for _, lay in rows],
                   "running_mean": mean, "running_var": [1.0] * len(rows)},
    })  # fmt: skip


NONFINITE = "nonfinite-running-stats"


def test_the_doctor_diagnoses_what_is_ingested_tells_it_and_silences_it(service, http):
    """A NaN running mean while the loss is finite: the batch's acknowledgement carries the
    diagnosis, the store keeps it, the API answers it, live listeners get a ``diagnosis``
    event, the runs list counts it; silenced, it stays listed and leaves the counts and the
    acknowledgements."""
    svc = service(doctor_share=1)  # each batch diagnosed as it comes
    api = http(svc)
    run = client_run(svc, name="doctor", meta={"layers": ["bn1", "bn2"]})
    w, rid = run["write_token"], run["id"]

    async def ingest_and_listen() -> tuple[list[dict[str, Any]], list[Any]]:
        events = svc.runs.follow(rid, None)
        assert (await anext(events)).kind == "status"
        acks = [svc.runs.ingest(rid, bn_batch(1, [1, 2, 3]), w),
                svc.runs.ingest(rid, bn_batch(2, [4, 5, 6], {"bn2": 5}), w)]  # fmt: skip
        got = [await anext(events) for _ in range(3)]
        await events.aclose()
        return acks, got

    acks, events = asyncio.run(ingest_and_listen())
    assert acks[0] == {"seq": 1, "stored": True}  # nothing found yet
    (found,) = acks[1]["diagnoses"]
    assert found["rule"] == NONFINITE and found["severity"] == "error"
    assert found["layers"] == ["bn2"] and found["first_step"] == 5 and found["last_step"] is None
    assert found["evidence"]["running_mean"] == "nan" and found["evidence"]["loss"] == 1.0
    assert found["fix"] and found["references"] and not found["silenced"]
    assert [(e.kind, e.seq) for e in events] == [("records", 1), ("records", 2), ("diagnosis", 2)]
    assert events[2].data == found
    assert svc.store.diagnoses.of_run(rid) == [found]
    report = wire(api.get(f"/api/runs/{rid}/diagnoses").json())
    assert report["diagnoses"] == [found] and report["steps"] == 6
    checked = {c["rule"]: c for c in report["checked"]}
    assert checked[NONFINITE]["checked"] and checked[NONFINITE]["reason"] is None
    assert not checked["small-batch"]["checked"] and checked["small-batch"]["reason"]
    assert svc.runs.newest(10)[0]["doctor"] == {"errors": 1, "warnings": 0}
    assert api.get("/api/runs").json()["items"][0]["doctor"] == {"errors": 1, "warnings": 0}

    # silenced: listed, marked, not counted, not acknowledged again
    r = api.put(f"/api/runs/{rid}/diagnoses/{NONFINITE}", json={"silenced": True})
    assert r.status_code == 200, r.text
    assert r.json()["diagnosis"] == {**found, "silenced": True}
    assert svc.diagnoses.report(svc.runs.get(rid))["diagnoses"] == [{**found, "silenced": True}]
    assert svc.runs.newest(10)[0]["doctor"] == {"errors": 0, "warnings": 0}
    later = svc.runs.ingest(rid, bn_batch(3, [7, 8], {"bn1": 7, "bn2": 5}), w)
    assert "diagnoses" not in later  # bn1 joins a silenced diagnosis: no news for the script
    assert svc.store.diagnoses.of_run(rid)[0]["layers"] == ["bn2", "bn1"]
    missing = api.put(f"/api/runs/{rid}/diagnoses/no-such-rule", json={"silenced": True})
    assert missing.status_code == 404 and NONFINITE in missing.json()["message"]
    assert (
        api.put(f"/api/runs/nope/diagnoses/{NONFINITE}", json={"silenced": True}).status_code == 404
    )
    assert api.put(f"/api/runs/{rid}/diagnoses/{NONFINITE}", json={"on": 1}).status_code == 422
    api.put(f"/api/runs/{rid}/diagnoses/{NONFINITE}", json={"silenced": False})
    assert svc.runs.newest(10)[0]["doctor"] == {"errors": 1, "warnings": 0}

    # an ended run is read as stored; deleting it deletes its diagnoses
    svc.runs.report_status(rid, StatusUpdate(status="completed"), w)
    ended = svc.diagnoses.report(svc.runs.get(rid))
    assert [d["rule"] for d in ended["diagnoses"]] == [NONFINITE] and ended["steps"] == 8
    svc.runs.delete(rid)
    assert svc.store.diagnoses.of_run(rid) == []
    assert api.get(f"/api/runs/{rid}/diagnoses").status_code == 404


def test_a_restarted_server_rebuilds_the_doctor_and_goes_on_without_repeating_itself(service):
    """A new service on the same database (the server restarted while a script trains) has no
    doctor for the run: the next batch rebuilds it from the stored records, then feeds it;
    what was found before is neither found again nor told again."""
    first = service(doctor_share=1)
    run = client_run(first, name="restart", meta={"layers": ["bn1", "bn2"]})
    w, rid = run["write_token"], run["id"]
    first.runs.ingest(rid, bn_batch(1, [1, 2, 3]), w)
    (found,) = first.runs.ingest(rid, bn_batch(2, [4, 5, 6], {"bn1": 5}), w)["diagnoses"]
    assert found["layers"] == ["bn1"] and found["first_step"] == 5

    again = service(doctor_share=1)  # the same database, nothing in memory
    quiet = again.runs.ingest(rid, bn_batch(3, [7, 8, 9], {"bn1": 5}), w)
    assert "diagnoses" not in quiet  # rebuilt from the store: the same diagnosis, not news
    changed = again.runs.ingest(rid, bn_batch(4, [10, 11], {"bn1": 5, "bn2": 11}), w)
    (grown,) = changed["diagnoses"]
    assert grown["layers"] == ["bn1", "bn2"] and grown["first_step"] == 5
    rows = again.store.diagnoses.of_run(rid)
    assert [(d["rule"], d["layers"], d["first_step"]) for d in rows] == [
        (NONFINITE, ["bn1", "bn2"], 5)
    ]
    assert again.diagnoses.report(again.runs.get(rid))["steps"] == 11  # the live doctor's

    # a report asked before any batch rebuilds it too, and the next batch continues it
    third = service(doctor_share=1)
    assert third.diagnoses.report(third.runs.get(rid))["steps"] == 11
    assert "diagnoses" not in third.runs.ingest(rid, bn_batch(5, [12], {"bn1": 5, "bn2": 11}), w)
    assert third.diagnoses.report(third.runs.get(rid))["steps"] == 12
    assert len(third.store.diagnoses.of_run(rid)) == 1


def test_the_doctor_takes_its_share_of_the_time_and_no_more(service):
    """Batches that come sooner after a diagnosis than the doctor's share of the time allows
    wait, and are diagnosed together with the next one allowed, or when the run's diagnoses
    are asked for, or when it ends: found then as they would have been one by one."""
    svc = service(doctor_share=1e-9)  # after one diagnosis, none for a long while
    run = client_run(svc, name="busy", meta={"layers": ["bn1", "bn2"]})
    w, rid = run["write_token"], run["id"]
    assert svc.runs.ingest(rid, bn_batch(1, [1, 2, 3]), w) == {"seq": 1, "stored": True}
    assert "diagnoses" not in svc.runs.ingest(rid, bn_batch(2, [4, 5, 6], {"bn1": 5}), w)
    assert svc.store.diagnoses.of_run(rid) == []  # it waits
    (found,) = svc.diagnoses.report(svc.runs.get(rid))["diagnoses"]  # asked: diagnosed now
    assert (found["layers"], found["first_step"]) == (["bn1"], 5)
    svc.runs.ingest(rid, bn_batch(3, [7, 8], {"bn1": 5, "bn2": 8}), w)
    svc.runs.report_status(rid, StatusUpdate(status="completed"), w)  # ended: diagnosed now
    (found,) = svc.store.diagnoses.of_run(rid)
    assert (found["layers"], found["first_step"]) == (["bn1", "bn2"], 5)


def test_an_ingest_never_fails_because_the_doctor_does(svc, monkeypatch, caplog):
    """A rule that raises: the batch is stored and acknowledged, the failure logged, and the
    run is not diagnosed further (its other batches are still taken); other runs are."""
    from bncore.diagnose.rules import NonfiniteRunningStats

    def broken(*_: Any) -> Any:
        raise RuntimeError("a rule's bug")

    monkeypatch.setattr(NonfiniteRunningStats, "feed", broken)
    run = client_run(svc, name="broken doctor", meta={"layers": ["bn1", "bn2"]})
    w, rid = run["write_token"], run["id"]
    with caplog.at_level("ERROR", logger="bnscope.server"):
        assert svc.runs.ingest(rid, bn_batch(1, [1, 2], {"bn1": 1}), w) == {
            "seq": 1,
            "stored": True,
        }
    assert "the BN doctor failed on run" in caplog.text and "a rule's bug" in caplog.text
    assert svc.runs.ingest(rid, bn_batch(2, [3, 4], {"bn1": 1}), w) == {"seq": 2, "stored": True}
    assert loss(svc, rid)["steps"] == [1, 2, 3, 4]
    assert svc.store.diagnoses.of_run(rid) == []
    monkeypatch.undo()
    other = client_run(svc, name="fine", meta={"layers": ["bn1", "bn2"]})
    ack = svc.runs.ingest(other["id"], bn_batch(1, [1, 2], {"bn1": 2}), other["write_token"])
    assert [d["rule"] for d in ack["diagnoses"]] == [NONFINITE]


def test_no_doctor_diagnoses_nothing(service):
    svc = service(no_doctor=True)
    run = client_run(svc, name="off", meta={"layers": ["bn1", "bn2"]})
    ack = svc.runs.ingest(run["id"], bn_batch(1, [1, 2], {"bn1": 1}), run["write_token"])
    assert ack == {"seq": 1, "stored": True}
    assert svc.store.diagnoses.of_run(run["id"]) == []

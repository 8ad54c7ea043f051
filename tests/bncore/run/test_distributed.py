"""One run over two real torch.distributed processes (gloo, 127.0.0.1): per-replica BN against
synchronized BN, each replica's statistics beside the global batch's, cancel, and the same run
through the server with one REST call."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from bncore.record.sinks import MemorySink
from bncore.run.config import ConfigError, parse_config
from bncore.run.distributed import train_replicas
from bnscope.process import ServerProcess, wait_for
from tests.helpers import FINAL, on_ranks


def _cfg(sync: bool, **over: object):
    return parse_config({"model": {"kind": "cnn", "depth": 3, "width": 16},
                         "data": {"name": "digits"}, "batch_size": 32, "steps": 40,
                         "eval_interval": 20, "distributed": {"replicas": 2, "sync_bn": sync},
                         **over})  # fmt: skip


@pytest.mark.timeout(300)
def test_per_replica_and_synchronized_bn_record_each_replica_beside_the_global_batch():
    layers = {}
    for sync in (False, True):
        sink = MemorySink()
        result = train_replicas(_cfg(sync), sink)
        assert result.status == "completed" and result.final["test_acc"] > 0.3
        rec = sink.records
        assert rec.layers["step"].max() == 40 and sink.meta["replicas"] == 2
        layers[sync] = t = {k: v[rec.layers["layer"] == "block1"] for k, v in rec.layers.items()}
        r0, r1, glob = t["r0_pre_var"], t["r1_pre_var"], t["global_pre_var"]
        assert np.isfinite(r0).all() and np.isfinite(r1).all()
        assert (r0 != r1).any()  # two shards, two batches
        assert (t["replica_mean_spread"] > 0).all() and (t["replica_var_spread"] > 0).all()
        # the global batch's variance holds both replicas' and the spread of their means
        assert (glob >= np.minimum(r0, r1) - 1e-6).all()
    # per-replica BN normalizes with its own batch (rank 0 reports its own), synchronized BN
    # with the global batch
    np.testing.assert_allclose(layers[False]["pre_var"], layers[False]["r0_pre_var"], rtol=1e-5)
    np.testing.assert_allclose(layers[True]["pre_var"], layers[True]["global_pre_var"], rtol=1e-4)
    assert not np.allclose(layers[True]["pre_var"], layers[True]["r0_pre_var"], rtol=1e-4)


@pytest.mark.timeout(300)
def test_a_cancelled_distributed_run_stops_every_replica():
    asked = iter(range(10**6))
    sink = MemorySink()
    result = train_replicas(_cfg(True, steps=2000), sink, should_stop=lambda: next(asked) > 2)
    assert result.status == "cancelled" and result.steps_done < 2000


def test_distributed_settings_are_checked_with_the_fields_named():
    with pytest.raises(ConfigError, match=r"must split evenly over distributed\.replicas=3"):
        parse_config({"batch_size": 32, "distributed": {"replicas": 3}})
    with pytest.raises(ConfigError, match=r"norm\.kind must be 'batch', not 'group'"):
        parse_config({"norm": {"kind": "group"}, "distributed": {"replicas": 2, "sync_bn": True}})


@pytest.mark.timeout(300)
def test_a_two_replica_run_is_one_rest_call_and_shows_both_statistics(tmp_path):
    srv = ServerProcess(tmp_path, "--max-runs", "1").start()
    try:
        with srv.client() as api:
            body = _cfg(True, steps=60).model_dump(mode="json")
            run = api.post("/api/runs", json=body).json()
            done = wait_for(lambda: (r := api.get(f"/api/runs/{run['id']}").json())["status"]
                            in FINAL and r, 240)  # fmt: skip
            assert done["status"] == "completed", done.get("message")
            assert done["meta"]["replicas"] == 2
            got = api.get(f"/api/runs/{run['id']}/metrics", params={
                "stat": ["replica_mean_spread", "r1_pre_var", "global_pre_var"],
                "layer": "block1"}).json()["series"]  # fmt: skip
            assert {s["stat"] for s in got} == {"replica_mean_spread", "r1_pre_var",
                                                 "global_pre_var"}  # fmt: skip
            assert all(s["points_total"] == 60 for s in got)
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_bnscope_train_runs_the_replicas_and_writes_their_records(tmp_path, capsys):
    import json

    from bncore.record.sinks import read_parquet
    from bnscope.cli import main

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(_cfg(False, steps=30).model_dump(mode="json")))
    assert main(["train", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    layers = read_parquet(tmp_path / "out").layers
    assert np.isfinite(layers["r1_pre_var"][layers["layer"] == "block0"]).all()
    with pytest.raises(ValueError, match="train_replicas"):
        from bncore.run.engine import train

        train(_cfg(False))


def _ddp_script(
    rank: int, url: str | None, out: str, batch: int = 16, broadcast_buffers: bool = True,
    default_url: str | None = None,
) -> None:  # fmt: skip
    """A user's data-parallel script (its own model, torch.nn's BN, DDP), reporting to BN Scope:
    every rank creates the run and watches; rank 0 owns it. ``batch``: each rank's. ``url``
    None: every rank's ``Client()`` is given none, the server being at ``default_url``."""
    import torch
    from torch import nn

    import bnscope.client
    import bnscope.local

    if default_url is not None:
        bnscope.local.DEFAULT_URL = default_url
    if rank > 0:  # rank 0 finds the server; rank k takes rank 0's, never looks for its own

        def own_server() -> str:
            raise AssertionError(f"rank {rank} looked for a server of its own")

        bnscope.local.server_url = own_server

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # fmt: skip
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    client = bnscope.client.Client(url)
    with client.create_run(name="ddp script", flush_every=5) as run:
        run.watch(model)
        for step in range(1, 21):
            torch.manual_seed(step * 10 + rank)  # each rank its own shard
            x, y = torch.randn(batch, 3, 8, 8) + rank, torch.randint(0, 4, (batch,))
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(step, loss)
    Path(out, f"run{rank}").write_text(run.id)


@pytest.mark.timeout(300)
def test_a_data_parallel_script_reports_every_rank_to_one_run(tmp_path):
    """Every rank's ``Client()`` given no URL: one server, rank 0's (bnscope.local)."""
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        script = functools.partial(_ddp_script, url=None, out=str(tmp_path), default_url=srv.url)
        on_ranks(script, tmp_path)
        ids = {p.read_text() for p in tmp_path.glob("run*")}
        assert len(ids) == 1  # one run, shared
        run_id = ids.pop()
        with srv.client() as api:
            run = wait_for(lambda: (r := api.get(f"/api/runs/{run_id}").json())["status"]
                           in FINAL and r, 60)  # fmt: skip
            assert run["status"] == "completed" and run["meta"]["replicas"] == 2
            assert run["meta"]["layers"] == ["1", "rank1.1"]
            asked = {"stat": "pre_mean", "layer": ["1", "rank1.1"]}
            got = api.get(f"/api/runs/{run_id}/metrics", params=asked).json()
            by = {s["layer"]: s for s in got["series"]}
            assert by["1"]["points_total"] == by["rank1.1"]["points_total"] == 20
            # rank 1's inputs are shifted by 1: its own statistics, not rank 0's
            assert by["rank1.1"]["values"][0] != by["1"]["values"][0]
            loss = api.get(f"/api/runs/{run_id}/metrics", params={"stat": "loss"}).json()
            assert loss["series"][0]["points_total"] == 20  # rank 0's, once
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_the_doctor_diagnoses_a_data_parallel_script(tmp_path):
    """8 examples per rank, BN not synchronized, and each rank's buffers its own
    (broadcast_buffers=False) while rank 1 sees shifted data: the BN doctor on the server says
    so (ddp-without-syncbn, rank-buffers-diverge)."""
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        script = functools.partial(_ddp_script, url=srv.url, out=str(tmp_path), batch=8,
                                   broadcast_buffers=False)  # fmt: skip
        on_ranks(script, tmp_path)
        (run_id,) = {p.read_text() for p in tmp_path.glob("run*")}
        with srv.client() as api:
            wait_for(lambda: api.get(f"/api/runs/{run_id}").json()["status"] in FINAL, 60)
            found = {d["rule"]: d for d in api.get(f"/api/runs/{run_id}/diagnoses").json()
                     ["diagnoses"]}  # fmt: skip
        ddp = found["ddp-without-syncbn"]
        assert ddp["evidence"]["per_replica_batch"] == 8 and ddp["evidence"]["replicas"] == 2
        assert found["rank-buffers-diverge"]["layers"] == ["1", "rank1.1"]
    finally:
        srv.stop()


@pytest.mark.timeout(120)
def test_a_failing_replica_fails_the_run_soon_and_says_why(tmp_path):
    """Data that cannot be read fails the run at once: no replica waits out the timeout."""
    import time

    cfg = _cfg(False, data={"name": "mnist", "path": str(tmp_path / "nowhere")})
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"nowhere|mnist"):
        train_replicas(cfg, MemorySink())
    assert time.monotonic() - t0 < 60

"""Experiments: every preset is a valid sweep of modest size, results are computed from the runs'
series, and one experiment runs end to end through a real server, matching its theory."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from bncore.run.config import get_field, parse_config, set_field
from bncore.science.experiments import EXPERIMENTS, Panel, Point, needs, result
from bnscope.process import ServerProcess, wait_for
from tests.helpers import FINAL


@pytest.mark.parametrize("key", list(EXPERIMENTS))
@pytest.mark.parametrize("size", ["quick", "full"])
def test_every_point_of_every_experiment_is_a_valid_run(key, size):
    exp = EXPERIMENTS[key]
    sweep = exp.sweep(size)
    base = sweep["base"]
    points = sweep.get("points") or [
        dict(zip(sweep["grid"], values, strict=True))
        for values in itertools.product(*sweep["grid"].values())
    ]
    assert 2 <= len(points) == exp.runs() <= 16
    for point in points:
        data = copy.deepcopy(base)
        for dotted, value in point.items():
            set_field(data, dotted, value)
        cfg = parse_config(data).model_dump()
        for dotted, value in point.items():
            assert get_field(cfg, dotted) == value
        assert set(exp.grid) <= set(point)
    assert exp.claim.endswith(".") and len(exp.panels) >= 1


def _point(values, config, series, layers=("block0", "block1")):
    return Point(config=config, values=values, series=series, layers=list(layers))


def test_by_value_panels_group_reduce_and_draw_theory_beside():
    panel_best = Panel("best", "by_value", ("test_acc",), "acc", x="optim.lr", reduce="best")
    panel_to = Panel("to", "by_value", ("test_acc",), "steps", x="optim.lr", reduce="steps_to",
                     target=0.5, theory=lambda cfg: 2 * get_field(cfg, "optim.lr"))  # fmt: skip
    exp = EXPERIMENTS["bn-vs-learning-rate"]
    exp = type(exp)(**{**exp.__dict__, "panels": (panel_best, panel_to)})
    steps = np.array([0, 50, 100])
    points = [
        _point({"optim.lr": lr, "norm.kind": kind}, {"optim": {"lr": lr}},
               {("", "test_acc"): (steps, np.array(acc, np.float32))})
        for lr, kind, acc in [(0.1, "batch", [0.1, 0.6, 0.7]), (0.01, "batch", [0.1, 0.2, 0.55]),
                              (0.1, "none", [0.1, 0.2, 0.3])]
    ]  # fmt: skip
    out = result(exp, points)
    best, to = out["panels"]
    by_name = {s["name"]: s for s in best["series"]}
    assert by_name["kind=batch"]["x"] == [0.01, 0.1]  # sorted along x
    assert by_name["kind=batch"]["y"] == pytest.approx([0.55, 0.7])
    assert by_name["kind=none"]["y"] == pytest.approx([0.3])
    to_series = {s["name"]: s for s in to["series"]}
    assert to_series["kind=batch"]["y"] == [100.0, 50.0]
    assert to_series["kind=none"]["y"] == [None]  # never reached
    theory = to_series["kind=batch: theory"]
    assert theory["theory"] and theory["y"] == pytest.approx([0.02, 0.2])
    assert out["claim"] == exp.claim


def test_over_steps_panels_read_the_last_block_and_stay_small():
    exp = EXPERIMENTS["ioffe-szegedy-figure-1"]
    steps = np.arange(0, 5000, dtype=np.int64)
    series = {("block2", s): (steps, np.linspace(0, 1, 5000, dtype=np.float32))
              for s in ("p15_0", "p50_0", "p85_0")}  # fmt: skip
    series["", "test_acc"] = (steps[:3], np.array([0.1, np.nan, 0.9], np.float32))
    point = _point({"norm.kind": "batch"}, {}, series, layers=("block0", "block1", "block2"))
    assert ("block2", "p50_0") in needs(exp, point.layers)
    acc, pct = result(exp, [point])["panels"]
    assert acc["series"][0]["y"] == [pytest.approx(0.1), pytest.approx(0.9)]  # NaN: dropped
    assert acc["series"][0]["x"] == [0, 2]
    assert len(pct["series"]) == 3 and all(len(s["x"]) <= 400 for s in pct["series"])
    assert pct["series"][0]["x"][0] == 0 and pct["series"][0]["x"][-1] == 4999


@pytest.mark.timeout(600)
def test_gradient_explosion_experiment_through_the_server_matches_yang_et_al(tmp_path):
    srv = ServerProcess(tmp_path, "--max-runs", "2").start()
    try:
        with srv.client() as api:
            listed = {e["key"]: e for e in api.get("/api/experiments").json()}
            assert set(listed) == set(EXPERIMENTS) and listed["gradient-explosion"]["runs"] == 10
            r = api.post("/api/experiments/gradient-explosion", json={"size": "quick"})
            assert r.status_code == 201, r.text
            sweep = r.json()
            assert sweep["experiment"] == "gradient-explosion" and len(sweep["runs"]) == 10
            for run in sweep["runs"]:
                wait_for(lambda run=run: api.get(f"/api/runs/{run['id']}").json()["status"]
                         in FINAL, 300)  # fmt: skip
            res = api.get(f"/api/sweeps/{sweep['id']}/result").json()
            assert res["runs_finished"] == res["runs_total"] == 10
            assert res["claim"] == EXPERIMENTS["gradient-explosion"].claim
            series = {s["name"]: s for s in res["panels"][0]["series"]}
            linear, theory = series["activation=linear"], series["activation=linear: Yang et al. "
                                                                 "mean field"]  # fmt: skip
            assert linear["x"] == [8, 16, 32, 64, 128]
            np.testing.assert_allclose(linear["y"], theory["y"], rtol=0.1)
            relu = series["activation=relu"]
            relu_theory = series["activation=relu: Yang et al. mean field"]["y"]
            assert relu_theory[0] == pytest.approx(1.789, rel=0.02)  # finite B, not the limit
            np.testing.assert_allclose(relu["y"], relu_theory, rtol=0.12)
            assert all(y > 1.2 for y in relu["y"])  # explodes at every batch size

            # bad inputs: clear 4xx, nothing queued
            before = api.get("/api/runs").json()["total"]
            missing = api.post("/api/experiments/nope")
            assert missing.status_code == 404 and "gradient-explosion" in missing.json()["message"]
            bad = api.post("/api/experiments/placement", json={"size": "huge"})
            assert bad.status_code == 422
            plain = api.post("/api/sweeps", json={"base": {"steps": 5, "model": {"depth": 1,
                             "width": 8}, "data": {"name": "digits"}},
                             "grid": {"optim.lr": [0.1]}}).json()  # fmt: skip
            no_view = api.get(f"/api/sweeps/{plain['id']}/result")
            assert no_view.status_code == 409 and "not started from an experiment" in no_view.text
            tiny = {"steps": 5, "model": {"depth": 1, "width": 8}, "data": {"name": "digits"}}
            pts = [{"batch_size": 8, "optim.lr": 0.01}, {"batch_size": 64, "optim.lr": 0.08}]
            zipped = api.post("/api/sweeps", json={"base": tiny, "points": pts}).json()
            got = sorted((r["config"]["batch_size"], r["config"]["optim"]["lr"])
                         for r in zipped["runs"])  # fmt: skip
            assert got == [(8, 0.01), (64, 0.08)]  # settings that move together, not a product
            both = api.post("/api/sweeps", json={"base": tiny, "points": pts,
                                                 "grid": {"seed": [1]}})  # fmt: skip
            assert both.status_code == 422 and "either grid" in both.text
            assert api.get("/api/runs").json()["total"] == before + 3
    finally:
        srv.stop()


def test_ioffe_szegedy_with_plain_sgd_keeps_the_sigmoid_input_stable_only_with_bn():
    """The paper's plain SGD (reduced): the last layer's tracked sigmoid input drifts much less
    with BN than without (with momentum 0.9 it drifted with BN too)."""
    from bncore.record.sinks import MemorySink
    from bncore.run.data import load_dataset
    from bncore.run.engine import Trainer

    exp = EXPERIMENTS["ioffe-szegedy-figure-1"]
    assert exp.base["optim"]["momentum"] == 0.0
    drift = {}
    for kind in ("batch", "none"):
        cfg = parse_config({**exp.base, "steps": 1200, "norm": {"kind": kind}})
        sink = MemorySink()
        Trainer(cfg, load_dataset(cfg.data)).run(sink)
        layers = sink.records.layers
        p50 = layers["p50_0"][layers["layer"] == "block2"]
        drift[kind] = abs(float(p50[-1] - p50[0]))
    assert drift["batch"] < drift["none"] / 2, drift


@pytest.mark.parametrize("key", list(EXPERIMENTS))
def test_every_experiment_says_whether_it_agrees_once_its_runs_are_there(key):
    exp = EXPERIMENTS[key]
    assert exp.verdict is not None
    assert result(exp, [])["verdict"] is None  # no runs yet: pending, not a guess


def _series_point(values: dict, **series: list[float]) -> Point:
    steps = np.arange(0, 50 * len(next(iter(series.values()))), 50)
    table = {("", k): (steps, np.asarray(v, np.float32)) for k, v in series.items()}
    return Point(config={}, values=values, layers=["block0"], series=table)


def test_a_verdict_says_where_the_measurement_disagrees():
    exp = EXPERIMENTS["noisy-bn"]
    acc = {"batch": [0.1, 0.60, 0.66, 0.66], "noisy": [0.1, 0.6, 0.66, 0.66],
           "none": [0.1, 0.6, 0.68, 0.69]}  # fmt: skip
    points = [_series_point({"norm.kind": k, "seed": 0}, test_acc=v) for k, v in acc.items()]
    verdict = result(exp, points)["verdict"]
    assert verdict["agrees"] is False
    assert "does not train better than no BN" in verdict["text"] and "0.657" in verdict["text"]
    acc["none"] = [0.1, 0.3, 0.4, 0.4]
    points = [_series_point({"norm.kind": k, "seed": 0}, test_acc=v) for k, v in acc.items()]
    assert result(exp, points)["verdict"]["agrees"] is True
    assert result(exp, points[:2])["verdict"] is None  # the run without BN is still to come


def test_signal_propagation_experiment_runs_here_and_agrees_with_brock_et_al(capsys):
    """The whole experiment (4 runs of one step, in this process): a BN ResNet's variance grows
    linearly, an unnormalized one's exponentially, SkipInit's not at all."""
    from bnscope.cli import main

    assert main(["experiment", "signal-propagation", "--json"]) == 0
    res = __import__("json").loads(capsys.readouterr().out)
    assert res["verdict"]["agrees"], res["verdict"]
    var = next(p for p in res["panels"] if p["kind"] == "by_layer")
    assert len(var["series"]) == 4 and len(var["series"][0]["x"]) == 18  # ResNet-38's blocks
    by = {s["name"]: s["y"] for s in var["series"]}
    raw = by["kind=none, skip_init=False"]
    assert raw[5] / raw[0] > 10  # doubling, roughly, through the first stage
    assert main(["experiment", "signal-propagation", "--set", "model.widht=3"]) == 2
    assert "model.widht: unknown field" in capsys.readouterr().err

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
            assert isinstance(res["verdict"]["agrees"], bool) and res["verdict"]["text"], res
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


# Every verdict can fail: each is fed measurements of the wrong shape, of no effect, of an effect
# within the noise or on only some seeds, and must say "does not agree"; and the right ones.


def _verdict(key: str, points: list[Point]) -> dict:
    verdict = result(EXPERIMENTS[key], points)["verdict"]
    assert verdict is not None, "the check found runs missing"
    return verdict


def _run(values: dict, config: dict | None = None, layers: dict | None = None,
         **series: list[float]) -> Point:  # fmt: skip
    """A run with step/eval ``series`` (one value every 50 steps) and per-layer series
    (``layers``: {layer: {stat: values}}), the last layer last."""
    table = {}
    for k, v in series.items():
        table["", k] = (np.arange(0, 50 * len(v), 50), np.asarray(v, np.float64))
    for layer, stats in (layers or {}).items():
        for k, v in stats.items():
            table[layer, k] = (np.arange(0, 50 * len(v), 50), np.asarray(v, np.float64))
    return Point(config=config or {}, values=values, series=table,
                 layers=list(layers or {"block0": {}}))  # fmt: skip


def _signal(kind: str, skip: bool, var: list[float], n: int = 6) -> Point:
    # a second stage, starting at half the first one's last variance (the zero-padding shortcut)
    stages = var + [var[-1] / 2 + v - var[0] for v in var]
    layers = {f"s{i // n}.b{i % n}.b": {"signal_var": [v], "branch_var": [1.0]}
              for i, v in enumerate(stages)}  # fmt: skip
    return _run({"norm.kind": kind, "model.skip_init": skip}, {"model": {"depth": n}}, layers)


def test_signal_propagation_tells_linear_from_exponential_growth():
    i = np.arange(6, dtype=np.float64)

    def verdict(bn: np.ndarray, raw: np.ndarray, skip: np.ndarray | None = None) -> dict:
        skip = np.ones(6) if skip is None else skip
        return _verdict("signal-propagation", [_signal("batch", False, bn.tolist()),
                        _signal("none", False, raw.tolist()),
                        _signal("none", True, skip.tolist())])  # fmt: skip

    right = verdict(1 + 0.8 * i, 2.0**i)
    assert right["agrees"], right["text"]
    assert "linear" in right["text"] and "x0.50" in right["text"]  # the zero-padding transition
    small_start = verdict(0.05 + 1.0 * i, 2.0**i)  # linear, though x2.2 per block on average
    assert small_start["agrees"], small_start["text"]
    assert not verdict(1.25**i, 2.0**i)["agrees"]  # BN growing exponentially, slowly
    assert not verdict(1 + 0.8 * i, 1 + 2 * i)["agrees"]  # unnormalized growing linearly: 1, 3, 5
    assert not verdict(1 + 0.8 * i, 2.0**i, 1.1**i)["agrees"]  # SkipInit not flat


def test_ema_vs_precise_bn_reads_the_final_evaluation():
    def verdict(ema_small: list[float], ema_large: list[float], precise: list[float]) -> dict:
        small = _run({"norm.momentum": 0.003}, test_acc=ema_small, test_acc_precise=precise)
        large = _run({"norm.momentum": 0.3}, test_acc=ema_large, test_acc_precise=precise)
        return _verdict("ema-vs-precise-bn", [small, large])

    precise = [0.1, 0.8, 0.9, 0.9, 0.9, 0.9]
    # a lag at the start only: +30 points on average over training, none at the end
    early = verdict([0.1, 0.1, 0.1, 0.9, 0.9, 0.9], precise, precise)
    assert not early["agrees"] and "0.900 test accuracy against the EMA's 0.900" in early["text"]
    lagging = verdict([0.1, 0.1, 0.7, 0.75, 0.78, 0.8], precise, precise)
    assert lagging["agrees"] and "+10.0 points" in lagging["text"], lagging["text"]
    assert not verdict([0.1, 0.1, 0.7, 0.75, 0.78, 0.8], [0.1, 0.1, 0.7, 0.75, 0.78, 0.8],
                       precise)["agrees"]  # fmt: skip # as large at the large momentum
    assert not verdict([0.1, 0.1, 0.7, 0.75, 0.92, 0.8], precise, precise)["agrees"]  # not all 3


def test_running_statistics_compares_the_gaps():
    def verdict(gaps: dict[float, float]) -> dict:
        return _verdict("running-statistics", [
            _run({"norm.momentum": m}, mode_gap=[0.0, g, g], test_acc=[0.1, 0.6, 0.6])
            for m, g in gaps.items()])  # fmt: skip

    assert verdict({0.001: 0.9, 0.01: 0.5, 0.1: 0.3, 0.5: 0.25})["agrees"]
    assert not verdict({0.001: 0.9, 0.01: 1.2, 0.1: 0.3, 0.5: 0.25})["agrees"]  # not the largest
    assert not verdict({0.001: 0.3, 0.01: 0.28, 0.1: 0.27, 0.5: 0.25})["agrees"]  # no lag
    assert not verdict({0.001: 0.2, 0.5: 0.3})["agrees"]  # the opposite


def _frozen(gains_small: list[float], gains_large: list[float]) -> dict:
    points = []
    for b, gains in ((2, gains_small), (64, gains_large)):
        for seed, g in enumerate(gains):
            for freeze, acc in ((None, 0.7), (0.75, 0.7 + g)):
                values = {"batch_size": b, "norm.freeze_after": freeze, "seed": seed}
                points.append(
                    _run(values, test_acc=[0.1, acc, acc], test_acc_batch=[0.1, 0.6, 0.6])
                )
    return _verdict("small-batch-frozen-bn", points)


def test_small_batch_frozen_bn_needs_a_gain_beyond_the_seeds_spread():
    right = _frozen([0.02, 0.025, 0.03], [0.0, -0.005, 0.002])
    assert right["agrees"], right["text"]
    assert "margin" in right["text"] and "on 3 of 3" in right["text"]
    assert not _frozen([0.001, 0.001, 0.001], [0.0, 0.0, 0.0])["agrees"]  # +0.1 point: noise
    assert not _frozen([0.06, -0.01, -0.01], [0.0, 0.0, 0.0])["agrees"]  # one seed of three
    assert not _frozen([0.02, 0.03, 0.01], [0.05, 0.05, 0.05])["agrees"]  # more at large batch


def _ioffe(acc_bn: list[float], acc_none: list[float], drift_bn: float = 0.4,
           drift_none: float = 3.0) -> dict:  # fmt: skip
    points = []
    for seed, (a, b) in enumerate(zip(acc_bn, acc_none, strict=True)):
        for kind, acc, drift in (("batch", a, drift_bn), ("none", b, drift_none)):
            points.append(_run({"norm.kind": kind, "seed": seed},
                               layers={"block2": {"p50_0": [0.0, drift / 2, drift]}},
                               test_acc=[0.1, acc, acc, acc]))  # fmt: skip
    return _verdict("ioffe-szegedy-figure-1", points)


def test_ioffe_szegedy_bn_must_train_higher_beyond_the_noise():
    assert _ioffe([0.60, 0.61, 0.59], [0.33, 0.35, 0.30])["agrees"]
    worse = _ioffe([0.59, 0.60, 0.58], [0.60, 0.61, 0.59])  # BN 1 point worse
    assert not worse["agrees"] and "BN does not train higher" in worse["text"]
    assert not _ioffe([0.60, 0.61, 0.40], [0.33, 0.35, 0.45])["agrees"]  # 2 of 3 seeds
    assert not _ioffe([0.60, 0.61, 0.59], [0.33, 0.35, 0.30], drift_bn=2.5)["agrees"]  # drifts


def _landscape(per_seed: list[tuple[float, float]]) -> dict:
    points = []
    for seed, (bn, none) in enumerate(per_seed):
        for kind, v in (("batch", bn), ("none", none)):
            flat = {k: [v] * 4 for k in ("landscape_loss_range", "grad_change",
                                         "beta_smoothness")}  # fmt: skip
            points.append(_run({"norm.kind": kind, "seed": seed},
                               train_loss=[2.3, 1.5, 1.2, 1.0], **flat))  # fmt: skip
    return _verdict("landscape", points)


def test_landscape_needs_bn_smoother_on_every_seed_beyond_the_margin():
    assert _landscape([(0.2, 0.5), (0.25, 0.6), (0.3, 0.5)])["agrees"]
    two_of_three = _landscape([(0.25, 0.30), (0.25, 0.32), (0.205, 0.152)])
    assert not two_of_three["agrees"] and "on 2 of 3" in two_of_three["text"]
    assert not _landscape([(0.29, 0.30), (0.29, 0.30), (0.29, 0.30)])["agrees"]  # 3%: in noise


def _explosion(rates: dict[int, float], curve: float = 0.0, depth: int = 24) -> dict:
    """Linear BN MLPs whose squared gradient grows by ``rate`` per layer towards the input,
    ``curve`` bending the log-norms (a drift of the rate with depth)."""
    rng = np.random.default_rng(0)
    points = []
    for b, rate in rates.items():
        depth_from_out = np.arange(depth)[::-1].astype(np.float64)
        log_sq = depth_from_out * np.log(rate) + curve * (depth_from_out - depth / 2) ** 2
        norms = np.exp(log_sq / 2) * np.exp(rng.normal(0, 0.002, (10, depth)))
        layers = {f"block{i}": {"grad_in_norm": norms[:, i].tolist()} for i in range(depth)}
        config = {"model": {"activation": "linear"}, "batch_size": b}
        points.append(_run({"model.activation": "linear", "batch_size": b}, config, layers))
    return _verdict("gradient-explosion", points)


def test_gradient_explosion_is_tested_within_its_uncertainty():
    from bncore.science.theory import gradient_explosion_rate as yang

    exact = {b: yang("linear", b) for b in (8, 16, 32)}
    assert _explosion(exact)["agrees"]
    assert not _explosion({**exact, 16: 1.2})["agrees"]  # off by 2.6x the excess
    assert not _explosion({b: 1.0 for b in exact})["agrees"]  # no explosion at all
    bent = _explosion({8: yang("linear", 8), 128: yang("linear", 128) + 0.0035}, curve=0.002)
    assert bent["agrees"], bent["text"]  # B=128's excess is within its uncertainty: not tested
    assert "neither confirm nor refute it: activation=linear, batch_size=128" in bent["text"]
    untested = _explosion({128: yang("linear", 128)}, curve=0.002)
    assert not untested["agrees"] and "cannot test the theory" in untested["text"]

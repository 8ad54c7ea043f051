"""Experiments: every preset is a valid sweep of modest size, results are computed from the runs'
series, and one experiment runs end to end through a real server, matching its theory."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from pathlib import Path

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
    # at most 3 seeds of a 7 x 2 grid: the quick size stays minutes on a 2-core CPU
    assert 2 <= len(points) == exp.runs() <= 42
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
    raw = by["kind=none, skip_init=False, shortcut=projection"]
    assert raw[5] / raw[0] > 10  # doubling, roughly, through the first stage
    assert main(["experiment", "signal-propagation", "--set", "model.widht=3"]) == 2
    assert "model.widht: unknown field" in capsys.readouterr().err


# Every verdict can fail: each experiment in the catalogue has measurements its verdict must reject
# (the opposite effect, no effect, an effect within the noise or on only some seeds, the wrong
# shape) and measurements it must accept, in WRONG and RIGHT below; a new experiment without them
# fails test_every_experiment_has_wrong_measurements.

SEEDS = (0, 1, 2)


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


def _lr(bn: list[float], none: list[float], shift: tuple[float, ...] = (0.0, 0.01, -0.01),
        seeds: int = 3) -> list[Point]:  # fmt: skip
    """bn-vs-learning-rate: the best test accuracy at each of 7 learning rates, each seed's
    shifted by ``shift``; ``bn`` and ``none`` may hold one list per seed."""
    lrs = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    points = []
    for seed in range(seeds):
        for kind, best in (("batch", bn), ("none", none)):
            row = best[seed] if isinstance(best[0], list) else best
            for lr, acc in zip(lrs, row, strict=True):
                points.append(_run({"optim.lr": lr, "norm.kind": kind, "seed": seed},
                                   test_acc=[0.1, acc + shift[seed]]))  # fmt: skip
    return points


_LR_BN = [0.6, 0.65, 0.7, 0.72, 0.7, 0.65, 0.3]  # usable at 5 learning rates
_LR_NONE = [0.3, 0.5, 0.65, 0.7, 0.4, 0.1, 0.1]  # at 2


def _groupnorm(drop_bn: list[float], drop_gn: list[float]) -> list[Point]:
    """batch-size-bn-vs-groupnorm: each seed's final accuracy 0.9 at batch 8 and 32, and 0.9
    less the drop at batch 2."""
    points = []
    for seed, drops in enumerate(zip(drop_bn, drop_gn, strict=True)):
        for kind, drop in zip(("batch", "group"), drops, strict=True):
            for b in (2, 8, 32):
                acc = 0.9 - drop * (b == 2)
                points.append(_run({"batch_size": b, "norm.kind": kind, "seed": seed},
                                   test_acc=[0.1, acc]))  # fmt: skip
    return points


def _placement(before: list[float], after: list[float], bias_before: float = 1e-8,
               bias_after: float = 1e-2) -> list[Point]:  # fmt: skip
    points = []
    for seed, accs in enumerate(zip(before, after, strict=True)):
        for where, acc, bias in zip(("before_activation", "after_activation"), accs,
                                    (bias_before, bias_after), strict=True):  # fmt: skip
            points.append(_run({"norm.placement": where, "seed": seed},
                               layers={"block3": {"layer_bias_grad_norm": [bias] * 4}},
                               test_acc=[0.1, acc, acc, acc]))  # fmt: skip
    return points


def _gaps(*per_seed: dict[float, float]) -> list[Point]:
    """running-statistics: each seed's mean train/eval gap by momentum."""
    return [_run({"norm.momentum": m, "seed": seed}, mode_gap=[0.0, g, g], test_acc=[0.1, 0.6])
            for seed, gaps in enumerate(per_seed) for m, g in gaps.items()]  # fmt: skip


_GAPS = {0.001: 0.9, 0.01: 0.5, 0.1: 0.3, 0.5: 0.25}


def _keras(keras: list[float], pytorch: list[float]) -> list[Point]:
    """pytorch-vs-keras: each seed's gap over the first third of training."""
    return [_run({"norm.convention": conv, "seed": seed}, mode_gap=[0.0, g, g, 0.1, 0.1, 0.1])
            for seed, gaps in enumerate(zip(keras, pytorch, strict=True))
            for conv, g in zip(("keras", "pytorch"), gaps, strict=True)]  # fmt: skip


def _noisy(batch: list[float], noisy: list[float], none: list[float]) -> list[Point]:
    return [_run({"norm.kind": kind, "seed": seed}, test_acc=[0.1, acc, acc, acc])
            for kind, accs in (("batch", batch), ("noisy", noisy), ("none", none))
            for seed, acc in enumerate(accs)]  # fmt: skip


def _ema(gain_small: list[float], gain_large: list[float], early: float = 0.0) -> list[Point]:
    """ema-vs-precise-bn: PreciseBN at 0.9 from the second evaluation on, the EMA ``gain``
    under it at the last; ``early``: the EMA's lag at the second evaluation."""
    points = []
    for seed, gains in enumerate(zip(gain_small, gain_large, strict=True)):
        for m, gain in zip((0.003, 0.3), gains, strict=True):
            ema = [0.1, 0.9 - early, 0.9 - gain / 2, 0.9 - gain]
            points.append(_run({"norm.momentum": m, "seed": seed}, test_acc=ema,
                               test_acc_precise=[0.1, 0.9, 0.9, 0.9]))  # fmt: skip
    return points


def _frozen(gains_small: list[float], gains_large: list[float]) -> list[Point]:
    points = []
    for b, gains in ((2, gains_small), (64, gains_large)):
        for seed, g in enumerate(gains):
            for freeze, acc in ((None, 0.7), (0.75, 0.7 + g)):
                values = {"batch_size": b, "norm.freeze_after": freeze, "seed": seed}
                points.append(
                    _run(values, test_acc=[0.1, acc, acc], test_acc_batch=[0.1, 0.6, 0.6])
                )
    return points


def _signal(kind: str, skip: bool, shortcut: str, var: list[float], reset: bool | None = None,
            n: int = 6) -> Point:  # fmt: skip
    """Three stages of ``var``; each later one starts where the first stage did (``reset``: by
    default with a projection shortcut) or from half the stage's last variance, the next branch
    adding to it (zero padding)."""
    reset = shortcut == "projection" if reset is None else reset
    stages = list(var)
    for _ in range(2):
        start = var[0] if reset else stages[-1] / 2 + var[1] - var[0]
        stages += [start + v - var[0] for v in var]
    layers = {f"res{i}.b": {"signal_var": [v], "branch_var": [1.0]}
              for i, v in enumerate(stages)}  # fmt: skip
    values = {"norm.kind": kind, "model.skip_init": skip, "model.shortcut": shortcut}
    return _run(values, {"model": {"depth": n}}, layers)


_I = np.arange(6, dtype=np.float64)


def _propagation(bn: np.ndarray, raw: np.ndarray, skip: np.ndarray | None = None,
                 resets: bool = True) -> list[Point]:  # fmt: skip
    """signal-propagation: the first stage's variance with BN (projection, and zero padding),
    without normalization and with SkipInit; ``resets``: whether the projection resets."""
    skip = np.ones(6) if skip is None else skip
    return [_signal("batch", False, "projection", bn.tolist(), reset=resets),
            _signal("batch", False, "zero_pad", bn.tolist()),
            _signal("none", False, "projection", raw.tolist()),
            _signal("none", True, "projection", skip.tolist())]  # fmt: skip


def _scale(growth: list[float], held: list[float], wds: tuple[float, ...] = (0.0, 5e-3),
           ) -> list[Point]:  # fmt: skip
    """scale-invariance: the last block's weight norm grows by ``growth`` without weight decay,
    and ends ``held`` times lower with the largest."""
    points = []
    for seed, (g, h) in enumerate(zip(growth, held, strict=True)):
        for wd in wds:
            end = 8 * g / (h if wd == wds[-1] else 1)
            norm = [8.0, (8.0 + end) / 2, end]
            layers = {"res2.b": {"weight_norm": norm, "eff_lr": [0.1 / w**2 for w in norm]}}
            points.append(_run({"optim.weight_decay": wd, "seed": seed}, layers=layers))
    return points


def _sync(gain_small: list[float], gain_large: list[float]) -> list[Point]:
    points = []
    for seed, gains in enumerate(zip(gain_small, gain_large, strict=True)):
        for b, gain in zip((4, 32), gains, strict=True):
            for sync in (False, True):
                acc = 0.3 + 0.6 * (b == 32) + gain * sync
                points.append(_run({"batch_size": b, "distributed.sync_bn": sync, "seed": seed},
                                   test_acc=[0.1, acc, acc],
                                   step_time=[0.01 * (1 + 2 * sync)] * 3))  # fmt: skip
    return points


def _ioffe(acc_bn: list[float], acc_none: list[float], drift_bn: float = 0.4,
           drift_none: float = 3.0) -> list[Point]:  # fmt: skip
    points = []
    for seed, (a, b) in enumerate(zip(acc_bn, acc_none, strict=True)):
        for kind, acc, drift in (("batch", a, drift_bn), ("none", b, drift_none)):
            points.append(_run({"norm.kind": kind, "seed": seed},
                               layers={"block2": {"p50_0": [0.0, drift / 2, drift]}},
                               test_acc=[0.1, acc, acc, acc]))  # fmt: skip
    return points


def _landscape(per_seed: list[tuple[float, float]]) -> list[Point]:
    points = []
    for seed, (bn, none) in enumerate(per_seed):
        for kind, v in (("batch", bn), ("none", none)):
            flat = {k: [v] * 4 for k in ("landscape_loss_range", "grad_change",
                                         "beta_smoothness")}  # fmt: skip
            points.append(_run({"norm.kind": kind, "seed": seed},
                               train_loss=[2.3, 1.5, 1.2, 1.0], **flat))  # fmt: skip
    return points


def _explosion(rates: dict[int, float], curve: float = 0.0, depth: int = 24) -> list[Point]:
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
    return points


def _yang(b: int) -> float:
    from bncore.science.theory import gradient_explosion_rate

    return gradient_explosion_rate("linear", b)


def _exact() -> dict[int, float]:
    return {b: _yang(b) for b in (8, 16, 32)}


#: Measurements each verdict must accept.
RIGHT: dict[str, Callable[[], list[Point]]] = {
    "bn-vs-learning-rate": lambda: _lr(_LR_BN, _LR_NONE),
    "ioffe-szegedy-figure-1": lambda: _ioffe([0.60, 0.61, 0.59], [0.33, 0.35, 0.30]),
    "gradient-explosion": lambda: _explosion(_exact()),
    "batch-size-bn-vs-groupnorm": lambda: _groupnorm([0.6, 0.55, 0.65], [0.05, 0.08, 0.03]),
    "placement": lambda: _placement([0.66, 0.65, 0.67], [0.65, 0.66, 0.655]),
    "running-statistics": lambda: _gaps(_GAPS, {**_GAPS, 0.001: 0.8}, {**_GAPS, 0.5: 0.2}),
    "pytorch-vs-keras": lambda: _keras([0.8, 0.9, 0.85], [0.35, 0.3, 0.4]),
    "noisy-bn": lambda: _noisy([0.57, 0.58, 0.56], [0.56, 0.57, 0.555], [0.47, 0.46, 0.48]),
    "landscape": lambda: _landscape([(0.2, 0.5), (0.25, 0.6), (0.3, 0.5)]),
    "ema-vs-precise-bn": lambda: _ema([0.07, 0.1, 0.08], [0.0, -0.002, 0.003]),
    "small-batch-frozen-bn": lambda: _frozen([0.02, 0.025, 0.03], [0.0, -0.005, 0.002]),
    "signal-propagation": lambda: _propagation(1 + 0.8 * _I, 2.0**_I),
    "scale-invariance": lambda: _scale([1.33, 1.3, 1.35], [3.0, 3.2, 2.9]),
    "per-replica-vs-sync-bn": lambda: _sync([0.6, 0.62, 0.58], [0.0, 0.003, -0.002]),
}

#: Measurements each verdict must reject, by what is wrong with them.
WRONG: dict[str, dict[str, Callable[[], list[Point]]]] = {
    "bn-vs-learning-rate": {
        "the opposite: wider without BN": lambda: _lr(_LR_NONE, _LR_BN),
        "no effect: as wide": lambda: _lr(_LR_BN, _LR_BN),
        "on 2 of 3 seeds": lambda: _lr([_LR_BN, _LR_BN, _LR_NONE], _LR_NONE),
    },
    "ioffe-szegedy-figure-1": {
        "the opposite: BN 1 point worse": lambda: _ioffe([0.59, 0.60, 0.58], [0.60, 0.61, 0.59]),
        "on 2 of 3 seeds": lambda: _ioffe([0.60, 0.61, 0.40], [0.33, 0.35, 0.45]),
        "no effect: BN's input drifts too": lambda: _ioffe(
            [0.60, 0.61, 0.59], [0.33, 0.35, 0.30], drift_bn=2.5
        ),
    },
    "gradient-explosion": {
        "the wrong rate: 2.6x the excess": lambda: _explosion({**_exact(), 16: 1.2}),
        "no effect: no explosion": lambda: _explosion({b: 1.0 for b in _exact()}),
        "untestable: the excess within the uncertainty": lambda: _explosion(
            {128: _yang(128)}, curve=0.002
        ),
    },
    "batch-size-bn-vs-groupnorm": {
        "no effect: BN does not fall": lambda: _groupnorm([0.02, 0.03, 0.01], [0.01, 0.02, 0.0]),
        "GroupNorm falls as much": lambda: _groupnorm([0.6, 0.55, 0.65], [0.6, 0.55, 0.6]),
        "the opposite: GroupNorm falls": lambda: _groupnorm([0.0, 0.01, 0.0], [0.5, 0.5, 0.5]),
        "on 2 of 3 seeds": lambda: _groupnorm([0.6, 0.55, 0.0], [0.05, 0.08, 0.03]),
    },
    "placement": {
        "the opposite: after is 10 points worse": lambda: _placement(
            [0.66, 0.65, 0.67], [0.56, 0.55, 0.57]
        ),
        "too noisy to say 'about as well'": lambda: _placement(
            [0.66, 0.60, 0.70], [0.62, 0.66, 0.64]
        ),
        "no effect: the bias gets its gradient": lambda: _placement(
            [0.66, 0.65, 0.67], [0.65, 0.66, 0.655], bias_before=5e-3
        ),
    },
    "running-statistics": {
        "not the largest at the smallest momentum": lambda: _gaps(*[{**_GAPS, 0.01: 1.2}] * 3),
        "no effect: no lag": lambda: _gaps(*[{0.001: 0.3, 0.01: 0.28, 0.1: 0.27, 0.5: 0.25}] * 3),
        "the opposite": lambda: _gaps(*[{0.001: 0.2, 0.5: 0.3}] * 3),
        "on 2 of 3 seeds": lambda: _gaps(
            _GAPS, _GAPS, {0.001: 0.2, 0.01: 0.25, 0.1: 0.3, 0.5: 0.3}
        ),
    },
    "pytorch-vs-keras": {
        "the opposite": lambda: _keras([0.35, 0.3, 0.4], [0.8, 0.9, 0.85]),
        "no effect: 10% more": lambda: _keras([0.385, 0.33, 0.44], [0.35, 0.3, 0.4]),
        "on 2 of 3 seeds": lambda: _keras([0.8, 0.9, 0.3], [0.35, 0.3, 0.4]),
    },
    "noisy-bn": {
        "no better than no BN": lambda: _noisy(
            [0.57, 0.58, 0.56], [0.47, 0.47, 0.48], [0.47, 0.46, 0.48]
        ),
        "5 points under BN": lambda: _noisy(
            [0.57, 0.58, 0.56], [0.52, 0.53, 0.51], [0.47, 0.46, 0.48]
        ),
        "on 2 of 3 seeds": lambda: _noisy(
            [0.57, 0.58, 0.56], [0.56, 0.57, 0.46], [0.47, 0.46, 0.48]
        ),
    },
    "landscape": {
        "on 2 of 3 seeds": lambda: _landscape([(0.25, 0.30), (0.25, 0.32), (0.205, 0.152)]),
        "no effect: 3%, in the noise": lambda: _landscape([(0.29, 0.30)] * 3),
        "the opposite": lambda: _landscape([(0.5, 0.2), (0.6, 0.25), (0.5, 0.3)]),
    },
    "ema-vs-precise-bn": {
        "a lag at the start only": lambda: _ema([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], early=0.8),
        "as large at the large momentum": lambda: _ema([0.07, 0.1, 0.08], [0.07, 0.1, 0.08]),
        "the opposite: the EMA better": lambda: _ema([-0.07, -0.1, -0.08], [0.0, 0.0, 0.0]),
        "on 2 of 3 seeds": lambda: _ema([0.07, 0.1, -0.01], [0.0, 0.0, 0.0]),
    },
    "small-batch-frozen-bn": {
        "no effect: +0.1 point": lambda: _frozen([0.001, 0.001, 0.001], [0.0, 0.0, 0.0]),
        "on 1 of 3 seeds": lambda: _frozen([0.06, -0.01, -0.01], [0.0, 0.0, 0.0]),
        "more at the large batch": lambda: _frozen([0.02, 0.03, 0.01], [0.05, 0.05, 0.05]),
    },
    "signal-propagation": {
        "BN growing exponentially (x1.25)": lambda: _propagation(1.25**_I, 2.0**_I),
        "unnormalized growing linearly": lambda: _propagation(1 + 0.8 * _I, 1 + 2 * _I),
        "SkipInit not flat": lambda: _propagation(1 + 0.8 * _I, 2.0**_I, 1.1**_I),
        "the projection does not reset": lambda: _propagation(1 + 0.8 * _I, 2.0**_I, resets=False),
    },
    "scale-invariance": {
        "no effect: the norm stays": lambda: _scale([1.0, 1.01, 0.99], [3.0, 3.2, 2.9]),
        "the opposite: the norm shrinks": lambda: _scale([0.8, 0.75, 0.8], [3.0, 3.2, 2.9]),
        "weight decay does not hold it": lambda: _scale([1.33, 1.3, 1.35], [1.0, 1.02, 0.98]),
        "no run without weight decay": lambda: _scale(
            [1.33, 1.3, 1.35], [3.0, 3.2, 2.9], wds=(5e-4, 5e-3)
        ),
    },
    "per-replica-vs-sync-bn": {
        "no effect": lambda: _sync([0.0, 0.01, -0.01], [0.0, 0.0, 0.0]),
        "more at the large batch": lambda: _sync([0.1, 0.1, 0.1], [0.3, 0.3, 0.3]),
        "on 2 of 3 seeds": lambda: _sync([0.6, 0.62, -0.02], [0.0, 0.0, 0.0]),
    },
}


@pytest.mark.parametrize("key", list(EXPERIMENTS))
def test_every_verdict_of_the_catalogue_rejects_wrong_measurements(key):
    """Every experiment has measurements its verdict must reject (at least three) and ones it
    must accept: a verdict without them could be one that cannot fail."""
    assert key in WRONG and len(WRONG[key]) >= 3, f"{key}: add its wrong measurements to WRONG"
    assert key in RIGHT, f"{key}: add measurements it must accept to RIGHT"
    right = _verdict(key, RIGHT[key]())
    assert right["agrees"], right["text"]
    assert right["measured"] and right["test"]
    accepted = {what: v["text"] for what, make in WRONG[key].items()
                if (v := _verdict(key, make()))["agrees"]}  # fmt: skip
    assert not accepted, f"{key} agrees with wrong measurements: {accepted}"


def test_verdicts_say_their_numbers_margins_and_where_they_fail():
    frozen = _verdict("small-batch-frozen-bn", RIGHT["small-batch-frozen-bn"]())
    assert "margin" in frozen["text"] and "on 3 of 3" in frozen["text"]
    assert "larger than" in frozen["test"] and "spread" in frozen["measured"]
    worse = _verdict(
        "ioffe-szegedy-figure-1",
        WRONG["ioffe-szegedy-figure-1"]["the opposite: BN 1 point worse"](),
    )
    assert "not shown beyond the noise on every seed: BN trains higher" in worse["text"]
    landscape = _verdict("landscape", WRONG["landscape"]["on 2 of 3 seeds"]())
    assert "on 2 of 3" in landscape["text"]
    noisy = _verdict("noisy-bn", WRONG["noisy-bn"]["5 points under BN"]())
    assert (
        "noisy BN about as good as BN" in noisy["text"] and "tolerance 3.0 points" in noisy["text"]
    )
    ema = _verdict("ema-vs-precise-bn", RIGHT["ema-vs-precise-bn"]())
    assert "+8.3 points (mean of 3 seeds" in ema["text"], ema["text"]
    start = _verdict("ema-vs-precise-bn", WRONG["ema-vs-precise-bn"]["a lag at the start only"]())
    assert "against the EMA's 0.900" in start["text"]


def test_signal_propagation_tells_linear_from_exponential_growth_and_a_reset():
    right = _verdict("signal-propagation", RIGHT["signal-propagation"]())
    assert "linear" in right["text"] and "exponential" in right["text"]
    assert "5.00 to 1.00 (x0.20)" in right["text"]  # the projection: back to the start
    assert "5.00 to 3.30 (x0.66)" in right["text"]  # zero padding: half, and the next branch
    small_start = _verdict("signal-propagation", _propagation(0.05 + 1.0 * _I, 2.0**_I))
    assert small_start["agrees"], small_start["text"]  # linear, though x2.2 per block on average


def test_gradient_explosion_is_tested_within_its_uncertainty():
    bent = _verdict("gradient-explosion", _explosion({8: _yang(8), 128: _yang(128) + 0.0035},
                                                     curve=0.002))  # fmt: skip
    assert bent["agrees"], bent["text"]  # B=128's excess is within its uncertainty: not tested
    assert "neither confirm nor refute it: activation=linear, batch_size=128" in bent["text"]
    untested = WRONG["gradient-explosion"]["untestable: the excess within the uncertainty"]
    assert "cannot test the theory" in _verdict("gradient-explosion", untested())["text"]


def _table_rows(document: str) -> tuple[list[str], list[list[str]]]:
    """The header line and the rows' cells of the results block of ``document``."""
    from bncore.science.experiments.report import RESULTS_BEGIN, RESULTS_END

    block = document.split(RESULTS_BEGIN, 1)[1].split(RESULTS_END, 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]
    return lines[:2], cells


def test_the_docs_results_table_is_the_one_bnscope_experiment_all_writes(tmp_path, monkeypatch,
                                                                         capsys):  # fmt: skip
    """`bnscope experiment --all --markdown FILE` writes one row per experiment between FILE's
    markers (here from measurements made up to agree, not runs), and docs/experiments.md's
    table has exactly that shape: its numbers come from a run of that command."""
    from bncore.science.experiments import local
    from bncore.science.experiments.report import RESULTS_BEGIN, RESULTS_COLUMNS, RESULTS_END
    from bnscope.cli import main

    monkeypatch.setattr(local, "points", lambda exp, *args, **kwargs: RIGHT[exp.key]())
    doc = tmp_path / "experiments.md"
    doc.write_text(f"# Experiments\n\n{RESULTS_BEGIN}\nSTALE\n{RESULTS_END}\n\nkept\n")
    assert main(["experiment", "--all", "--markdown", str(doc)]) == 0
    written = doc.read_text()
    assert "STALE" not in written and written.endswith(f"{RESULTS_END}\n\nkept\n")
    header, rows = _table_rows(written)
    assert header[0] == "| " + " | ".join(RESULTS_COLUMNS) + " |"
    assert [r[0] for r in rows] == [f"`{k}`" for k in EXPERIMENTS]
    assert all(len(r) == len(RESULTS_COLUMNS) and r[-1] == "agrees" for r in rows), rows
    by_key = {r[0].strip("`"): r for r in rows}
    assert by_key["placement"][1] == EXPERIMENTS["placement"].claim
    assert "spread" in by_key["placement"][2] and "standard errors" in by_key["placement"][3]

    docs = (Path(__file__).resolve().parents[3] / "docs" / "experiments.md").read_text()
    docs_header, docs_rows = _table_rows(docs)
    assert docs_header == header
    assert [r[0] for r in docs_rows] == [r[0] for r in rows]
    for row in docs_rows:
        key = row[0].strip("`")
        assert len(row) == len(RESULTS_COLUMNS), key
        assert row[1].replace("\\|", "|") == EXPERIMENTS[key].claim, key
        assert row[-1] in ("agrees", "**disagrees**", "pending"), row

    # printed, for one experiment; a file only takes every experiment's rows, and its markers
    assert main(["experiment", "placement", "--markdown"]) == 0
    assert capsys.readouterr().out.count("\n| `placement` |") == 1
    assert main(["experiment", "placement", "--markdown", str(doc)]) == 2
    assert "add --all" in capsys.readouterr().err
    doc.write_text("no markers")
    assert main(["experiment", "--all", "--markdown", str(doc)]) == 2
    assert "no results block" in capsys.readouterr().err
    assert main(["experiment"]) == 2 and "or give --all" in capsys.readouterr().err

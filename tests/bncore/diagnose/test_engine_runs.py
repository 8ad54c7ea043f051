"""The BN doctor on BN Scope's own runs: a pitfall a run's config provokes is diagnosed, the
same run without it is not, and an experiment's result says whether the doctor found what the
experiment provokes on purpose (the full arms, at quick size: benchmarks/doctor.py)."""

from __future__ import annotations

import pytest

from bncore.diagnose import diagnose, diagnose_files
from bncore.record.sinks import ParquetSink
from bncore.run.config import parse_config
from bncore.run.engine import Trainer, train
from bncore.science.experiments import EXPERIMENTS
from bncore.science.experiments.framework import Point, result
from bncore.science.experiments.local import configs, point

SMALL = {"model": {"kind": "mlp", "depth": 3, "width": 32}, "data": {"name": "digits"},
         "steps": 120, "eval_interval": 40, "batch_size": 64}  # fmt: skip


def rules(overrides: dict, steps: int = 120) -> dict[str, str]:
    cfg = parse_config({**SMALL, **overrides, "steps": steps})
    res = train(cfg)
    return {d.rule: d.severity for d in diagnose(res.records, res.meta).diagnoses}


def test_a_healthy_run_is_silent_and_its_pitfalls_are_found():
    healthy = rules({})
    assert not [r for r, s in healthy.items() if s != "info"], healthy
    assert rules({"batch_size": 4})["small-batch"] == "warning"
    assert rules({"norm": {"momentum": 0.9}})["momentum-convention"] == "warning"
    assert rules({"norm": {"momentum": "cumulative"}})["cumulative-momentum-in-training"]
    assert (
        rules({"model": {"kind": "mlp", "depth": 3, "width": 32, "bias": True}}).get(
            "bias-before-bn"
        )
        == "info"
    )


def test_a_run_without_batch_norm_is_checked_for_nothing_bn():
    res = train(parse_config({**SMALL, "norm": {"kind": "group"}, "batch_size": 4}))
    doctor = diagnose(res.records, res.meta)
    assert not doctor.diagnoses
    reasons = {c["reason"] for c in doctor.checked() if not c["checked"]}
    assert "the run has no batch normalization" in reasons


def test_offline_on_the_parquet_files_equals_the_records(tmp_path):
    cfg = parse_config({**SMALL, "batch_size": 8, "norm": {"momentum": 0.7}})
    sink = ParquetSink(tmp_path)
    trainer = Trainer(cfg)
    trainer.run(sink)
    from_files = [d.to_dict() for d in diagnose_files(tmp_path).diagnoses]
    res = train(cfg)
    in_memory = [d.to_dict() for d in diagnose(res.records, res.meta).diagnoses]
    assert from_files == in_memory
    assert {d["rule"] for d in from_files} >= {"small-batch", "momentum-convention"}


def test_an_experiment_says_whether_the_doctor_found_what_it_provokes():
    exp = EXPERIMENTS["batch-size-bn-vs-groupnorm"]
    points = []
    for config in configs(exp):
        if (config["batch_size"] in (2, 128) and config["norm"]["kind"] == "batch"
                and config["seed"] == 0):  # fmt: skip
            config = {**config, "steps": 30}  # the pitfall is in the config: any length shows it
            res = train(parse_config(config))
            assert res.records is not None
            found = diagnose(res.records, res.meta).diagnoses
            points.append(point(exp, config, res.records, found))
    out = result(exp, points)
    by_arm = {p["where"]: p for p in out["provoked"]}
    assert by_arm["batch_size=2, kind=batch"]["found"] is True
    assert by_arm["batch_size=2, kind=batch"]["control_clear"] is True
    assert by_arm["batch_size=4, kind=batch"]["found"] is None  # not run here
    assert {r["run"] for r in out["diagnoses"]} == {
        "batch_size=2, kind=batch, seed=0",
        "batch_size=128, kind=batch, seed=0",
    }


def test_an_arm_that_misses_its_pitfall_says_so():
    exp = EXPERIMENTS["running-statistics"]
    empty: dict = {}
    points = [
        Point({}, {"norm.momentum": m}, empty, [], diagnoses=found)
        for m, found in ((0.001, []), (0.1, [("stale-running-stats", "warning")]))
    ]
    (provoked,) = result(exp, points)["provoked"]
    assert provoked["found"] is False and provoked["control_clear"] is False


@pytest.mark.parametrize("kind", ["ghost", "renorm", "noisy"])
def test_the_other_batch_normalizations_are_checked_too(kind):
    found = rules({"norm": {"kind": kind}, "batch_size": 8})
    assert "small-batch" in found


def test_every_preset_is_silent_but_for_the_pitfalls_it_shows_on_purpose():
    """The Launch form's presets, each point shortened to 150 steps (benchmarks/doctor.py runs
    them at their full quick size): no warning or error but where a preset shows a pitfall on
    purpose: a batch under 16, a learning rate (3.0) that leaves the run at chance."""
    from bncore.run.sweep import grid_points, point_config
    from dashboard.form import PRESETS

    for name, preset in PRESETS.items():
        for values in grid_points(preset["grid"]):
            config = point_config({**preset["base"], "steps": 150}, values)
            res = train(parse_config(config))
            found = {d.rule for d in diagnose(res.records, res.meta).diagnoses
                     if d.severity != "info"}  # fmt: skip
            bn = values.get("norm.kind") != "none"
            expected = set()
            if bn and values.get("batch_size", 64) < 16:
                expected.add("small-batch")
            if bn and values.get("optim.lr", 0) >= 3.0:  # the sweep's top: chance accuracy
                expected.add("dead-channels")  # what broke it: most ReLUs never fire
            assert found == expected, (name, values, found)

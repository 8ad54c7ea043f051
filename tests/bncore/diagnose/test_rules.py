"""Each rule of the BN doctor, injected into records shaped as a user's script sends them, fires
with its rule id, layer and step; the same records without the pitfall stay silent; and the
doctor says the same whether the records come in one batch or many."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bncore.diagnose import RULES, Doctor, diagnose
from bncore.diagnose.catalogue import diagnoses_markdown
from bncore.record.tables import Records

LAYERS = ("bn1", "layer1.bn", "layer2.bn")
C = 8


def client_meta(**over: Any) -> dict[str, Any]:
    """A watched model's meta: three BN layers after ReLUs, torch's defaults."""
    config = {"class": "BatchNorm2d", "momentum": 0.1, "eps": 1e-5, "affine": True,
              "track_running_stats": True, "dtype": "float32"}  # fmt: skip
    meta: dict[str, Any] = {
        "layers": list(LAYERS),
        "layer_config": {n: dict(config) for n in LAYERS},
        "bn_modules": list(LAYERS),
        "structure": {"dropout_before": {}, "output_layer": None, "zero_init_gamma": [],
                      "bias_before": [], "activation": dict.fromkeys(LAYERS, "relu")},
        "optimizer": {"norm_weight_decay": dict.fromkeys(LAYERS, 0.0), "weight_decay": 1e-4},
        "distributed": {"world": 1, "sync_bn": False},
    }  # fmt: skip
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key] = {**meta[key], **value}
        else:
            meta[key] = value
    return meta


def healthy(steps: int = 400, seed: int = 0, channel_every: int = 20) -> Records:
    """A healthy run's records: shuffled batches of 64 around slowly drifting statistics, an
    EMA (momentum 0.1) that follows them, gradients on gamma and beta, a falling loss."""
    rng = np.random.default_rng(seed)
    n, m = 64, 64 * 16
    rows: dict[str, list] = {k: [] for k in ("step", "layer")}
    cols: dict[str, list] = {}
    chans: dict[str, list] = {"step": [], "layer": []}
    running = {name: (np.zeros(C), np.ones(C)) for name in LAYERS}
    for step in range(1, steps + 1):
        for j, name in enumerate(LAYERS):
            pop_mean = 0.5 * np.sin(step / 300 + j) + np.linspace(-1, 1, C)
            pop_var = 1.0 + 0.3 * j + 0.1 * np.cos(step / 200)
            mean = pop_mean + rng.normal(0, np.sqrt(pop_var / 64), C)  # correlated positions
            var = pop_var * (1 + rng.normal(0, 0.05, C))
            rm, rv = running[name]
            rm, rv = 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var * m / (m - 1)
            running[name] = (rm, rv)
            gamma, beta = np.ones(C) + 0.1 * j, np.full(C, 0.05)
            values = {
                "pre_mean": mean.mean(), "pre_var": var.mean(), "pre_var_min": var.min(),
                "running_mean": rm.mean(), "running_var": rv.mean(),
                "running_mean_gap": np.sqrt(np.mean((rm - mean) ** 2)),
                "gamma": gamma.mean(), "beta": beta.mean(), "gamma_grad_norm": 0.1,
                "beta_grad_norm": 0.1, "act_dead": 0.01, "weight_norm": 5.0,
                "weight_grad_norm": 0.5, "batch_n": n, "batch_m": m, "forwards": 1,
                "forwards_no_grad": 0, "backwards": 1,
            }  # fmt: skip
            rows["step"].append(step)
            rows["layer"].append(name)
            for k, v in values.items():
                cols.setdefault(k, []).append(v)
            if step % channel_every == 0:
                chans["step"].append(step)
                chans["layer"].append(name)
                for k, v in (("gamma", gamma), ("beta", beta), ("pre_mean", mean),
                             ("pre_var", var), ("running_mean", rm), ("running_var", rv),
                             ("gamma_grad", rng.normal(0, 0.1, C))):  # fmt: skip
                    chans.setdefault(k, []).append(v)
    layers = {k: np.asarray(v) for k, v in rows.items()}
    layers |= {k: np.asarray(v, dtype=np.float32) for k, v in cols.items()}
    steps_t = {"step": np.arange(1, steps + 1), "loss": np.linspace(2.0, 0.5, steps),
               "lr": np.full(steps, 0.1)}  # fmt: skip
    channels = {k: (np.asarray(v) if k in ("step", "layer") else np.stack(v))
                for k, v in chans.items()}  # fmt: skip
    ev = np.arange(50, steps + 1, 50)
    evals = {"step": ev, "mode_gap": np.full(len(ev), 0.05), "test_acc": np.full(len(ev), 0.9)}
    return Records(steps=steps_t, layers=layers, channels=channels, evals=evals)


def where(rec: Records, layer: str, first: int) -> np.ndarray:
    """The layers-table rows of ``layer`` from step ``first`` on."""
    return (rec.layers["layer"] == layer) & (rec.layers["step"] >= first)


def found(rec: Records, meta: dict[str, Any]) -> dict[str, Any]:
    return {d.rule: d for d in diagnose(rec, meta).diagnoses}


def test_a_healthy_run_is_silent():
    got = found(healthy(), client_meta())
    assert not [d for d in got.values() if d.severity != "info"], got


def test_every_rule_is_documented_and_the_docs_are_current():
    from pathlib import Path

    docs = Path(__file__).resolve().parents[3] / "docs" / "diagnoses.md"
    assert docs.read_text() == diagnoses_markdown(), "regenerate docs/diagnoses.md"
    assert len({r.id for r in RULES}) == len(RULES) == 22
    for rule in RULES:
        assert rule.threshold and rule.fix and rule.references and rule.checks, rule.id


def inject(name: str) -> tuple[Records, dict[str, Any], str, int]:
    """Records with pitfall ``name`` from step 200 on (or from the start, for a setup rule),
    their meta, the layer it is in, the step it starts."""
    rec, meta, layer, at = healthy(), client_meta(), "layer1.bn", 200
    rows = where(rec, layer, at)
    if name == "nonfinite-running-stats":
        rec.layers["running_var"][rows] = np.inf
    elif name == "batch-of-one":
        rec.layers["batch_n"][rows] = 1
    elif name == "momentum-convention":
        meta["layer_config"][layer]["momentum"] = 0.99
        at = 1
    elif name == "cumulative-momentum-in-training":
        meta["layer_config"][layer]["momentum"] = None
        at = 51
    elif name == "running-stats-not-updating":
        rec.layers["running_mean"][rows] = 0.25
        rec.layers["running_var"][rows] = 1.5
        at += 2
    elif name == "frozen-but-updating":
        rec.layers["gamma_grad_norm"][rows] = np.nan
        at += 2
    elif name == "validation-in-train-mode":
        rec.layers["forwards_no_grad"][rows & (rec.layers["step"] % 50 == 0)] = 3
        at = 200
    elif name == "bn-eval-during-training":
        rec.layers["forwards"][rows] = 0  # eval mode: no batch statistics, buffers still
        for col in ("pre_mean", "pre_var", "pre_var_min"):
            rec.layers[col][rows] = np.nan
        for col in ("running_mean", "running_var"):
            rec.layers[col][rows] = rec.layers[col][where(rec, layer, at - 1)][0]
        at += 1
    elif name == "small-batch":
        rec.layers["batch_n"][rows] = 8
        at += 2  # the median of the last 5
    elif name == "grad-accumulation-micro-batch":
        rec.layers["batch_n"][rows], rec.layers["forwards"][rows] = 8, 4
        at += 2
    elif name == "ddp-without-syncbn":
        meta["distributed"] = {"world": 4, "sync_bn": False}
        rec.layers["batch_n"][:] = 8
        at, layer = 1, "bn1"
    elif name == "rank-buffers-diverge":
        meta["distributed"] = {"world": 2, "sync_bn": True}
        other = {k: v[rec.layers["layer"] == layer].copy() for k, v in rec.layers.items()}
        other["layer"] = np.full(len(other["step"]), f"rank1.{layer}")
        late = other["step"] >= at  # rank 1 sees other data, and its buffers follow them
        other["running_mean"][late] += 1.0
        other["pre_mean"][late] += 1.0
        rec.layers = {k: np.concatenate([v, other[k]]) for k, v in rec.layers.items()}
        at += 2
    elif name == "stale-running-stats":
        rows = where(rec, layer, 1)
        # the EMA stops following: it holds its start while the batches move away
        rec.layers["running_mean"][rows] = np.where(
            rec.layers["step"][rows] >= at, -2.0, rec.layers["running_mean"][rows]
        )
        at = None  # after the warm-up and two windows
    elif name == "non-iid-batches":
        first = rec.layers["layer"] == "bn1"
        steps = rec.layers["step"][first]
        rec.layers["pre_mean"][first] += np.where((steps // 8) % 2 == 0, 1.5, -1.5)
        layer, at = "bn1", None
    elif name == "dropout-before-bn":
        meta["structure"]["dropout_before"] = {layer: 0.5}
        at = 1
    elif name == "dead-channels":
        chan = (rec.channels["layer"] == layer) & (rec.channels["step"] >= at)
        rec.channels["beta"][chan, :3] = -5.0  # 3 of 8 channels: beta/|gamma| < -3
        at += 20
    elif name == "constant-channel":
        rec.layers["pre_var_min"][rows] = 1e-8
        at += 9
    elif name == "weight-decay-on-norm":
        meta["optimizer"]["norm_weight_decay"][layer] = 0.5
        chan = rec.channels["layer"] == layer
        rec.channels["gamma_grad"][chan] *= 1e-3
        at = None
    elif name == "effective-lr-decay":
        meta["optimizer"]["weight_decay"] = 0.0
        rec.layers["weight_norm"][rec.layers["layer"] == "bn1"] = np.sqrt(np.linspace(25, 100, 400))
        layer, at = "bn1", None
    elif name == "bias-before-bn":
        meta["structure"]["bias_before"] = [layer]
        at = 1
    elif name == "bn-before-output":
        meta["structure"]["output_layer"] = layer
        at = 1
    elif name == "train-eval-gap":
        rec.evals["mode_gap"][rec.evals["step"] >= at] = 0.9
        at = None
    else:
        raise AssertionError(name)
    return rec, meta, layer, at


@pytest.mark.parametrize("rule", [r.id for r in RULES])
def test_each_rule_fires_where_it_is_injected(rule):
    rec, meta, layer, at = inject(rule)
    got = found(rec, meta)
    assert rule in got, f"{rule} did not fire; found {sorted(got)}"
    d = got[rule]
    if rule != "train-eval-gap":  # names a layer only with eval-mode input records
        assert layer in d.layers, d.layers
    if at is not None:
        assert at <= d.first_step <= at + 20, d.first_step
    assert d.message and d.fix and d.references and d.evidence
    unrelated = {r for r, x in got.items() if x.severity != "info"} - {rule, "train-eval-gap"}
    # a pitfall may also show as a symptom the others name; these are the expected pairs
    allowed = {"batch-of-one": {"small-batch"}, "bn-eval-during-training": set(),
               "nonfinite-running-stats": {"stale-running-stats"},
               "running-stats-not-updating": {"stale-running-stats"},
               "rank-buffers-diverge": set()}  # fmt: skip
    assert unrelated <= allowed.get(rule, set()), unrelated


@pytest.mark.parametrize("chunk", [1, 7, 120])
def test_in_batches_or_at_once_the_diagnoses_are_the_same(chunk):
    rules = ("small-batch", "nonfinite-running-stats", "stale-running-stats", "dead-channels",
             "non-iid-batches", "constant-channel")  # fmt: skip
    for rule in rules:
        rec, meta, _, _ = inject(rule)
        whole = [d.to_dict() for d in diagnose(rec, meta).diagnoses]
        doctor = Doctor(meta)
        for lo in range(1, 401, chunk):
            part = Records(**{
                name: {k: v[(t["step"] >= lo) & (t["step"] < lo + chunk)] for k, v in t.items()}
                for name, t in rec.tables().items() if t
            })  # fmt: skip
            doctor.feed(part)
        assert [d.to_dict() for d in doctor.diagnoses] == whole, rule


def test_what_cannot_be_checked_says_why():
    rec = healthy(50)
    for col in ("batch_n", "batch_m", "forwards", "forwards_no_grad", "backwards"):
        del rec.layers[col]
    checked = {c["rule"]: c for c in diagnose(rec, {"layers": list(LAYERS)}).checked()}
    assert not checked["validation-in-train-mode"]["checked"]
    assert "forwards_no_grad" in checked["validation-in-train-mode"]["reason"]
    assert not checked["momentum-convention"]["checked"]
    assert checked["nonfinite-running-stats"]["checked"]
    assert checked["ddp-without-syncbn"]["reason"] == "the run is not data-parallel"


def test_silenced_diagnoses_stay_listed_and_marked():
    rec, meta, _, _ = inject("validation-in-train-mode")
    doctor = Doctor(meta, silenced={"validation-in-train-mode"})
    doctor.feed(rec)
    (d,) = [d for d in doctor.diagnoses if d.rule == "validation-in-train-mode"]
    assert d.silenced
    assert doctor.silence("validation-in-train-mode", False) is d and not d.silenced


def test_a_gap_that_closes_is_resolved():
    rec = healthy()
    rec.evals["mode_gap"][(rec.evals["step"] >= 150) & (rec.evals["step"] < 300)] = 0.9
    d = found(rec, client_meta())["train-eval-gap"]
    assert d.first_step == 250 and d.last_step == 350

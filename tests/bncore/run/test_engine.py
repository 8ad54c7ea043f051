"""The training engine on real data: what it records equals an independent recomputation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import bncore
from bncore.record.core import QUANTILES
from bncore.record.sinks import MemorySink
from bncore.run.engine import Trainer, train
from tests.helpers import channel_dims, small_config


def test_loss_falls_and_accuracy_rises():
    result = train(small_config(steps=150))
    assert result.status == "completed" and result.steps_done == 150
    loss = result.records.steps["loss"]
    assert loss[-20:].mean() < 0.5 * loss[:20].mean()
    evals = result.records.evals
    assert evals["step"][0] == 0 and evals["step"][-1] == 150
    assert evals["test_acc"][-1] > 0.8 and evals["test_acc"][-1] > evals["test_acc"][0] + 0.5
    assert result.final["test_acc"] == pytest.approx(float(evals["test_acc"][-1]), abs=1e-6)


def _recompute(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, units: list[list[int]], activation: str
):
    """Everything the recorder reports for one step, computed directly on a copy."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, block in model.blocks():

        def grab(mod, inp, out, name=name):
            seen.setdefault(name, {})["z"] = out
            out.retain_grad()

        def grab_norm(mod, inp, out, name=name):
            seen[name]["n"] = out
            out.retain_grad()

        hooks += [
            block.layer.register_forward_hook(grab),
            block.norm.register_forward_hook(grab_norm),
        ]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for h in hooks:
        h.remove()
    out = {}
    for i, (name, block) in enumerate(model.blocks()):
        z, n = seen[name]["z"], seen[name]["n"]
        dims = channel_dims(z)
        if activation == "relu":
            a = torch.relu(n)
            frac0 = (a <= 0).float().mean(dims)
        else:
            a = torch.tanh(n)
            frac0 = (a <= -0.99).float().mean(dims) + (a >= 0.99).float().mean(dims)
        u = n.detach()[:, units[i]]
        bn = block.norm
        out[name] = {
            "pre_mean": z.detach().mean(dims),
            "pre_var": z.detach().var(dims, correction=0),
            "post_mean": n.detach().mean(dims),
            "post_var": n.detach().var(dims, correction=0),
            "act_mean": a.detach().mean(dims),
            "act_var": a.detach().var(dims, correction=0),
            "act_saturated": frac0,
            "act_dead": (frac0 == 1).float().mean(),
            "running_mean": bn.running_mean,
            "running_var": bn.running_var,
            "gamma": bn.weight.detach(),
            "beta": bn.bias.detach(),
            "gamma_grad": bn.weight.grad,
            "beta_grad": bn.bias.grad,
            "grad_out_sq": n.grad.square().sum(dims),
            "grad_in_sq": z.grad.square().sum(dims),
            "weight_grad_norm": block.layer.weight.grad.norm(),
            "pct": torch.quantile(u, torch.tensor(QUANTILES) / 100, dim=0),  # (3, k)
        }
    return out


@pytest.mark.parametrize(
    ("activation", "kernel"),
    [
        ("relu", None),  # BN writes everything itself, activation statistics included
        ("tanh", None),  # the activation's statistics measured after the backward
        ("relu", "reference"),  # the record written by the kernels' common Python path
    ],
)
def test_recorded_statistics_equal_an_independent_recomputation(activation, kernel):
    with bncore.nn.kernels.use(kernel):
        _check_recorded_statistics(activation)


def _check_recorded_statistics(activation: str) -> None:
    cfg = small_config(steps=50, channel_interval=1, model={"activation": activation})
    trainer = Trainer(cfg)
    for _ in range(7):  # a few steps in, so gamma, beta and the running statistics have moved
        trainer.step()
    trainer.flush()
    batches = []
    next_batch = trainer.next_batch
    trainer.next_batch = lambda: batches.append(next_batch()) or batches[-1]
    trainer.recorder.arm(False)
    before = copy.deepcopy(trainer.model)
    trainer.step()
    rec = trainer.flush()
    x, y = batches[0]
    units = [s.units.tolist() for s in trainer.recorder.slots]
    expected = _recompute(before, x, y, units, activation)
    layers, chans = rec.layers, rec.channels
    assert list(layers["layer"]) == list(expected) and (layers["step"] == 8).all()
    tol = dict(rtol=1e-4, atol=1e-5)
    for row, name in enumerate(expected):
        e = expected[name]
        for col in (
            "pre_mean",
            "pre_var",
            "post_mean",
            "post_var",
            "act_mean",
            "act_var",
            "act_saturated",
            "running_mean",
            "running_var",
            "gamma",
            "beta",
            "gamma_grad",
            "beta_grad",
            "grad_out_sq",
            "grad_in_sq",
        ):
            np.testing.assert_allclose(chans[col][row], e[col].numpy(), **tol, err_msg=col)
        summary = {
            "pre_mean": e["pre_mean"].mean(),
            "pre_var": e["pre_var"].mean(),
            "pre_var_max": e["pre_var"].max(),
            "act_dead": e["act_dead"],
            "act_saturated": e["act_saturated"].mean(),
            "gamma_grad_norm": e["gamma_grad"].norm(),
            "beta_grad_norm": e["beta_grad"].norm(),
            "grad_out_norm": e["grad_out_sq"].sum().sqrt(),
            "grad_in_norm": e["grad_in_sq"].sum().sqrt(),
            "weight_grad_norm": e["weight_grad_norm"],
            "running_mean_gap": (e["running_mean"] - e["pre_mean"]).square().mean().sqrt(),
        }
        for col, value in summary.items():
            np.testing.assert_allclose(layers[col][row], float(value), **tol, err_msg=col)
        for j in range(len(units[row])):
            for q, name_q in enumerate(("p15", "p50", "p85")):
                np.testing.assert_allclose(
                    layers[f"{name_q}_{j}"][row],
                    float(e["pct"][q, j]),
                    **tol,
                    err_msg=f"{name_q}_{j}",
                )


def test_post_bn_statistics_sit_at_beta_and_gamma_squared():
    result = train(small_config(steps=40, channel_interval=1))
    ch = result.records.channels
    np.testing.assert_allclose(ch["post_mean"], ch["beta"], atol=1e-6)
    ratio = ch["post_var"] / ch["gamma"] ** 2
    assert np.all(ratio <= 1.0 + 1e-6) and np.median(ratio) > 0.99  # var/(var+eps) of 1


def test_runs_without_bn_record_the_same_positions():
    with_bn = train(small_config(steps=30)).records.layers
    without = train(small_config(steps=30, norm={"kind": "none"})).records.layers
    assert set(with_bn) == set(without)
    assert list(with_bn["layer"][:3]) == list(without["layer"][:3])
    assert np.isnan(without["running_mean_gap"]).all() and np.isnan(without["gamma"]).all()
    for col in (
        "pre_var",
        "post_var",
        "act_var",
        "grad_in_norm",
        "grad_out_norm",
        "beta_grad_norm",
        "weight_grad_norm",
        "p50_0",
    ):
        assert np.isfinite(without[col]).all(), col
    # no normalization: what leaves the norm position is what entered it
    np.testing.assert_allclose(without["post_var"], without["pre_var"])
    np.testing.assert_allclose(without["grad_in_norm"], without["grad_out_norm"])


@pytest.mark.parametrize(
    "over",
    [
        {"norm": {"placement": "after_activation"}},
        {"model": {"activation": "sigmoid"}},
        {"model": {"activation": "tanh"}, "norm": {"convention": "keras"}},
        {"model": {"kind": "cnn", "width": 8}},
        {"norm": {"momentum": "cumulative"}, "optim": {"name": "adam", "lr": 0.01}},
    ],
)
def test_variants_train_and_record(over):
    result = train(small_config(steps=25, **over))
    assert result.status == "completed"
    layers = result.records.layers
    assert len(layers["step"]) == 25 * 3
    for col in ("pre_var", "act_var", "act_saturated", "grad_in_norm", "weight_grad_norm"):
        assert np.isfinite(layers[col]).all(), col


def test_saturation_of_sigmoid_units():
    result = train(
        small_config(
            steps=5, model={"activation": "sigmoid"}, norm={"kind": "none"}, optim={"lr": 0.01}
        )
    )
    sat = result.records.layers["act_saturated"]
    assert ((sat >= 0) & (sat <= 1)).all()


def test_columns_are_the_documented_ones():
    from bncore.record.tables import EVAL_COLUMNS, LAYER_COLUMNS, PERCENTILE_COLUMN, STEP_COLUMNS

    rec = train(small_config(steps=5, eval_interval=5)).records
    assert set(rec.steps) == {"step", *STEP_COLUMNS}
    assert set(rec.evals) == {"step", *EVAL_COLUMNS}
    own = {"eff_lr", "angular_update"}  # optional: BN Scope's own networks only
    extra = set(rec.layers) - {"step", "layer", *LAYER_COLUMNS, *own}
    assert extra and all(PERCENTILE_COLUMN.fullmatch(c) for c in extra)
    assert set(LAYER_COLUMNS) | own <= set(rec.layers)
    assert not rec.layer_evals  # a plain network without precise_bn measures none


def test_flushed_records_do_not_change_when_training_goes_on():
    """A flush of a single step used to hand out a view on the recorder's buffer: the next step
    overwrote that step's weight gradient norms in records already given to the sink."""
    t = Trainer(small_config(steps=5))
    flushed = []
    for _ in range(3):
        t.step()
        flushed.append(t.flush())  # one step per flush, as a slow first step causes
    before = [{k: v.copy() for k, v in r.layers.items()} for r in flushed]
    for _ in range(2):
        t.step()
        t.flush()
    for rec, saved in zip(flushed, before, strict=True):
        for col, values in saved.items():
            np.testing.assert_array_equal(rec.layers[col], values, col)
    norms = [r.layers["weight_grad_norm"] for r in flushed]
    assert not np.array_equal(norms[0], norms[1])  # each step's own gradients


def test_intervals():
    rec = train(small_config(steps=40, stats_interval=5, channel_interval=3)).records
    assert len(rec.steps["step"]) == 40
    recorded = np.unique(rec.layers["step"])
    assert list(recorded) == [1, 6, 11, 16, 21, 26, 31, 36]
    assert list(np.unique(rec.channels["step"])) == [1, 16, 31]
    assert rec.channels["pre_mean"].shape == (3 * 3, 24)


def test_a_seed_reproduces_a_run():
    a = train(small_config(steps=30, seed=3)).records
    b = train(small_config(steps=30, seed=3)).records
    c = train(small_config(steps=30, seed=4)).records
    for table in ("steps", "layers", "channels", "evals"):
        for col, values in getattr(a, table).items():
            if col in ("step_time", "time"):
                continue
            np.testing.assert_array_equal(values, getattr(b, table)[col], err_msg=col)
    assert not np.array_equal(a.steps["loss"], c.steps["loss"])


def test_huge_learning_rate_diverges_and_keeps_its_records():
    sink = MemorySink()
    cfg = small_config(
        steps=400,
        norm={"kind": "none"},
        model={"activation": "linear"},
        optim={"lr": 50.0, "momentum": 0.9},
    )
    result = Trainer(cfg).run(sink)
    assert result.status == "diverged", result
    assert "loss became" in result.message and result.steps_done < 400
    rec = sink.records
    assert len(rec.steps["step"]) == result.steps_done
    assert not np.isfinite(rec.steps["loss"][-1]) or not np.isfinite(rec.steps["loss"]).all()
    assert len(rec.layers["step"]) == 3 * result.steps_done
    assert sink.summary["status"] == "diverged"


def test_cancel_stops_the_run():
    calls = []
    result = Trainer(small_config(steps=500)).run(
        MemorySink(), should_stop=lambda: len(calls) > 30 or calls.append(1)
    )
    assert result.status == "cancelled" and result.steps_done == 31


def test_cuda_asked_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        Trainer(small_config(device="cuda"))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_recorded_batch_of_another_size_is_a_clear_error(activation):
    trainer = Trainer(small_config(steps=5, model={"activation": activation}))
    trainer.recorder.arm(True)
    x, _ = trainer.next_batch()
    with pytest.raises(RuntimeError, match="batch"):
        trainer.model(x[:16])


@pytest.mark.parametrize(
    ("optim", "expected"),
    [
        (
            {"schedule": "cosine", "warmup_steps": 4},  # linear warmup, then cosine towards 0
            [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 16)) for k in range(16)],
        ),
        (
            {"schedule": "step", "milestones": [0.25, 0.5], "gamma": 0.5},
            [1.0] * 5 + [0.5] * 5 + [0.25] * 10,
        ),
        ({}, [1.0] * 20),
    ],
)
def test_the_learning_rate_follows_its_schedule_and_is_recorded_per_step(optim, expected):
    cfg = small_config(steps=20, optim={"lr": 0.2, **optim})
    lr = train(cfg).records.steps["lr"]
    np.testing.assert_allclose(lr, 0.2 * np.asarray(expected), rtol=1e-6)


def test_norm_parameters_can_be_left_out_of_weight_decay():
    from bncore.run.engine import Trainer

    for decay_norm in (True, False):
        t = Trainer(
            small_config(steps=1, optim={"weight_decay": 0.01, "norm_weight_decay": decay_norm})
        )
        norm = {id(p) for _, b in t.model.blocks() for p in b.norm.parameters()}
        assert norm  # gamma and beta of every block
        for group in t.optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            if group["weight_decay"] == 0.0:
                assert not decay_norm and ids == norm
            else:
                assert group["weight_decay"] == 0.01 and (decay_norm or not ids & norm)
        seen = sum(len(g["params"]) for g in t.optimizer.param_groups)
        assert seen == len(list(t.model.parameters()))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_the_optimizer_steps_every_parameter_at_once(name):
    """One foreach pass per operation over all parameters (torch picks a Python loop over them
    on the CPU), in one group where no weight decay tells gamma and beta apart; the same
    trajectory as torch's per-parameter loop."""
    from bncore.run.engine import Trainer

    cfg = small_config(steps=3, optim={"name": name, "lr": 0.05})
    t = Trainer(cfg)
    assert t.optimizer.defaults["foreach"] is True
    assert len(t.optimizer.param_groups) == 1
    ref = Trainer(cfg)
    cls = type(ref.optimizer)
    ref.optimizer = cls(ref.model.parameters(), **{**ref.optimizer.defaults, "foreach": False})
    ref.schedule = torch.optim.lr_scheduler.LambdaLR(ref.optimizer, t.schedule.lr_lambdas[0])
    for trainer in (t, ref):
        for _ in range(3):
            trainer.step()
    for a, b in zip(t.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

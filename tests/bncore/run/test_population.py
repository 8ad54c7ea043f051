"""What BN does in a network, measured beside the training: population statistics (PreciseBN)
against the EMA ones, FrozenBN, signal propagation through a residual network, and the scale
invariance of the weights before BN (their norm, effective learning rate, angular update)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bncore.run.config import parse_config
from bncore.run.engine import Trainer, train
from bncore.run.population import ema_gaps, population_statistics
from bncore.run.propagation import signal_propagation


def _resnet_cfg(**over: object):
    base: dict = {
        "model": {"kind": "resnet", "depth": 1, "width": 8},
        "data": {"name": "digits"},
        "batch_size": 32,
    }
    for key, value in over.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return parse_config(base)


def test_precise_bn_equals_an_independent_recomputation_over_the_same_batches():
    t = Trainer(_resnet_cfg(steps=20))
    for _ in range(20):
        t.step()
    batches = [t.data.x_train[i * 32 : (i + 1) * 32] for i in range(5)]
    state = {k: v.clone() for k, v in t.model.state_dict().items()}
    got = population_statistics(t.model, t.norms, batches)
    for k, v in t.model.state_dict().items():  # the model is left as it was
        assert torch.equal(v, state[k]), k
    # independently: every normalization's inputs over the K batches, in training mode
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in t.norms}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: inputs[n].append(a[0].detach().double()))
        for n, m in t.norms.items()
    ]
    t.model.load_state_dict(state)
    with torch.no_grad():
        for x in batches:
            t.model(x)
    for h in hooks:
        h.remove()
    t.model.load_state_dict(state)
    assert set(got) == set(t.norms) and len(got) == 7
    for name, (mean, var) in got.items():
        every = torch.cat([x.transpose(0, 1).flatten(1) for x in inputs[name]], 1)  # (C, K n)
        torch.testing.assert_close(mean.double(), every.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), every.var(1, correction=1), rtol=1e-5, atol=1e-6)


def test_ema_gap_shrinks_with_larger_momentum_and_precise_bn_gives_the_accuracy_back():
    """Wu & Johnson: with a large batch and a small momentum the EMA lags the moving model."""
    gaps, accs = {}, {}
    for momentum in (0.01, 0.3):
        cfg = _resnet_cfg(steps=60, eval_interval=60, batch_size=256, precise_bn=8,
                          norm={"momentum": momentum}, optim={"lr": 0.1})  # fmt: skip
        rec = train(cfg).records
        le = rec.layer_evals
        last = le["step"] == 60
        gaps[momentum] = float(np.mean(le["ema_mean_gap"][last]))
        ev = {k: v[-1] for k, v in rec.evals.items()}
        accs[momentum] = (ev["test_acc"], ev["test_acc_precise"], ev["test_acc_batch"])
    assert gaps[0.3] < gaps[0.01] / 3, gaps
    # momentum does not change training (BN normalizes with batch statistics): the same model,
    # whose lagging EMA statistics cost accuracy that PreciseBN's give back
    ema, precise, batch = accs[0.01]
    assert accs[0.3][1:] == (precise, batch)
    assert precise > ema + 0.02 and batch > ema + 0.01, accs
    assert accs[0.3][0] > ema and abs(precise - accs[0.3][0]) < 0.02, accs


def test_ema_gaps_are_zero_for_the_population_itself():
    t = Trainer(_resnet_cfg(steps=1))
    stats = population_statistics(t.model, t.norms, [t.data.x_train[:32]])
    for name, (mean, var) in stats.items():
        t.norms[name].running_mean.copy_(mean)
        t.norms[name].running_var.copy_(var)
    assert all(g == pytest.approx((0.0, 0.0), abs=1e-5) for g in ema_gaps(t.norms, stats).values())


def test_frozen_bn_normalizes_with_fixed_population_statistics_after_the_freeze():
    cfg = _resnet_cfg(steps=20, eval_interval=20, precise_bn=4, norm={"freeze_after": 0.5})
    t = Trainer(cfg)
    for _ in range(10):
        t.step()
    assert not t.frozen
    t.step()  # step 11 > 0.5 * 20: frozen first
    assert t.frozen
    frozen = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in t.norms.items()}
    weights_before = t.model.stem.layer.weight.detach().clone()
    for _ in range(5):
        t.step()
    for n, m in t.norms.items():
        assert torch.equal(m.running_mean, frozen[n][0]) and torch.equal(
            m.running_var, frozen[n][1]
        )
    assert not torch.equal(t.model.stem.layer.weight, weights_before)  # training goes on
    x = t.data.x_train[:8]
    t.model.eval()
    with torch.no_grad():
        eval_out = t.model(x)
    t.model.train()
    with torch.no_grad():
        train_out = t.model(x)
    torch.testing.assert_close(train_out, eval_out)  # training normalizes as evaluation does
    rec = t.flush().layers
    assert rec["step"].max() <= 10  # no batch statistics recorded once frozen


def test_signal_propagation_equals_a_direct_computation():
    for over in ({}, {"residual": "pre"}, {"skip_init": True}):
        t = Trainer(_resnet_cfg(steps=1, model=over))
        x = t.data.x_train[:32]
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        got = signal_propagation(t.model, x)
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, before[k]), k
        # by hand: the stem, then each block's shortcut and branch, in training mode
        with torch.no_grad():
            h = t.model.stem(x)
            for name, r in t.model.residual_blocks():
                branch = r.b(r.a(h))
                if r.skip_gain is not None:
                    branch = branch * r.skip_gain
                out = r.shortcut(h) + branch
                h = torch.relu(out) if r.post_relu else out
                var, mean = torch.var_mean(h.double(), [0, 2, 3], correction=0)
                bvar = torch.var(branch.double(), [0, 2, 3], correction=0)
                want = (float(mean.square().mean()), float(var.mean()), float(bvar.mean()))
                assert got[name] == pytest.approx(want, rel=1e-5, abs=1e-9), name
        t.model.load_state_dict(before)
    skip = signal_propagation(Trainer(_resnet_cfg(model={"skip_init": True},
                                                  norm={"kind": "none"})).model, x)  # fmt: skip
    assert all(v[2] == 0 for v in skip.values())  # SkipInit: no branch at initialization


def test_signal_propagation_is_recorded_at_each_evaluation_at_the_blocks_last_unit():
    rec = train(_resnet_cfg(steps=4, eval_interval=2)).records.layer_evals
    assert sorted(set(rec["step"].tolist())) == [0, 2, 4]
    at = set(rec["layer"][np.isfinite(rec["signal_var"])].tolist())
    assert at == {"res0.b", "res1.b", "res2.b"}


def _scale_invariant_run(weight_decay: float):
    cfg = parse_config({"model": {"kind": "cnn", "depth": 3, "width": 16},
                        "data": {"name": "digits"}, "steps": 150, "eval_interval": 150,
                        "optim": {"lr": 0.2, "weight_decay": weight_decay}})  # fmt: skip
    return train(cfg).records.layers


def test_weight_norm_of_a_scale_invariant_weight_grows_without_weight_decay():
    free, decayed = _scale_invariant_run(0.0), _scale_invariant_run(0.01)
    for rec in (free, decayed):  # every channel_interval (10) recorded steps
        assert np.isfinite(rec["weight_norm"][rec["step"] % 10 == 1]).all()
    sel = (free["layer"] == "block1") & np.isfinite(free["weight_norm"])
    norms, eff = free["weight_norm"][sel], free["eff_lr"][sel]
    assert norms[-1] > 1.5 * norms[0]  # SGD on a sphere only grows the radius
    assert eff[-1] < eff[0] / 2  # so the effective learning rate lr/||w||^2 falls
    kept = (decayed["layer"] == "block1") & np.isfinite(decayed["weight_norm"])
    assert decayed["weight_norm"][kept][-1] < norms[-1]
    np.testing.assert_allclose(eff, 0.2 / norms.astype(np.float64) ** 2, rtol=1e-5)


def test_output_is_unchanged_when_a_weight_before_bn_is_scaled():
    t = Trainer(parse_config({"model": {"kind": "cnn", "depth": 3, "width": 16},
                              "data": {"name": "digits"}}))  # fmt: skip
    x = t.data.x_train[:64]
    with torch.no_grad():
        y = t.model(x)
        t.model.block1.layer.weight.mul_(7.0)
        torch.testing.assert_close(t.model(x), y, rtol=1e-4, atol=1e-4)


def test_angular_update_equals_the_angle_between_the_weights_before_and_after_the_step():
    t = Trainer(parse_config({"model": {"depth": 2, "width": 32}, "steps": 3,
                              "channel_interval": 1}))  # fmt: skip
    w = t.model.block0.layer.weight
    angles = []
    for _ in range(3):
        before = w.detach().clone()
        t.step()
        a, b = before.flatten().double(), w.detach().flatten().double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
        angles.append(math.acos(min(1.0, float(cos))))
        norm_before = float(before.norm())
    rec = t.flush().layers
    got = rec["angular_update"][rec["layer"] == "block0"]
    np.testing.assert_allclose(got, angles, rtol=1e-3)
    assert rec["weight_norm"][rec["layer"] == "block0"][-1] == pytest.approx(norm_before, rel=1e-6)


def test_the_fused_weight_turn_is_the_angle_between_the_weights():
    """bncore::weight_turn (the recorder's one pass on CPU): each weight's norm before the step
    and the angle it turned by, against float64 torch; NaN for a weight of norm 0."""
    from bncore.nn.kernels import cpu

    if not cpu.available():
        pytest.skip("the fused CPU kernel did not build here")
    torch.manual_seed(0)
    before = [torch.randn(256, 256), torch.randn(32, 1, 3, 3), torch.randn(7), torch.zeros(5)]
    after = [b + 1e-3 * torch.randn_like(b) for b in before]
    got = torch.ops.bncore.weight_turn(before, after)
    assert got.shape == (2, 4) and got.dtype == torch.float32
    for i, (p, q) in enumerate(zip(before[:3], after[:3], strict=True)):
        p, q = p.flatten().double(), q.flatten().double()
        cos = float(torch.nn.functional.cosine_similarity(p, q, dim=0))
        assert float(got[0, i]) == pytest.approx(float(p.norm()), rel=1e-6)
        assert float(got[1, i]) == pytest.approx(math.acos(min(1.0, cos)), rel=1e-3)
    assert float(got[0, 3]) == 0 and math.isnan(got[1, 3])


def test_a_frozen_run_with_precise_bn_writes_the_same_columns_to_the_end(tmp_path):
    """PreciseBN stops at the freeze; its columns stay (NaN), so Parquet's schema holds."""
    from bncore.record.sinks import ParquetSink, read_parquet

    cfg = _resnet_cfg(steps=12, eval_interval=3, precise_bn=2, norm={"freeze_after": 0.5})
    Trainer(cfg).run(ParquetSink(tmp_path), flush_every=1)
    rec = read_parquet(tmp_path)
    ev = rec.evals
    assert list(ev["step"]) == [0, 3, 6, 9, 12]
    assert (
        np.isfinite(ev["test_acc_precise"][:3]).all() and np.isnan(ev["test_acc_precise"][3:]).all()
    )
    le = rec.layer_evals
    assert set(le["step"].tolist()) == {0, 3, 6, 9, 12}
    assert np.isnan(le["ema_mean_gap"][le["step"] > 6]).all()


def test_weight_norms_and_angles_are_taken_on_the_steps_whose_channels_are_kept():
    """They need a copy of the weights: every channel_interval recorded steps, like the
    per-channel arrays."""
    t = Trainer(parse_config({"model": {"depth": 2, "width": 32}, "steps": 12,
                              "channel_interval": 5}))  # fmt: skip
    for _ in range(12):
        t.step()
    rec = t.flush()
    sel = rec.layers["layer"] == "block0"
    for stat in ("angular_update", "weight_norm", "eff_lr"):
        measured = rec.layers["step"][sel][np.isfinite(rec.layers[stat][sel])]
        assert measured.tolist() == sorted(set(rec.channels["step"].tolist())) == [1, 6, 11]

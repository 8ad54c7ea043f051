"""Internal covariate shift and the landscape along the gradient (Santurkar et al. 2018): equal
to an independent recomputation, zero where the definition says so, and invisible to training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bncore.run.config import ConfigError, parse_config
from bncore.run.engine import Trainer, train
from bncore.run.landscape import landscape
from tests.helpers import small_config


@pytest.mark.parametrize("kind", ["batch", "none", "noisy"])
def test_measuring_changes_nothing_in_training(kind):
    plain = train(small_config(steps=30, norm={"kind": kind}))
    measured = train(small_config(steps=30, norm={"kind": kind}, ics_interval=5, landscape=True))
    np.testing.assert_array_equal(plain.records.steps["loss"], measured.records.steps["loss"])
    np.testing.assert_array_equal(
        plain.records.evals["test_acc"], measured.records.evals["test_acc"]
    )
    for col in ("running_mean", "pre_var", "weight_grad_norm"):
        np.testing.assert_array_equal(plain.records.layers[col], measured.records.layers[col], col)


def test_ics_is_zero_for_the_first_block_and_nan_between_measurements():
    layers = train(small_config(steps=20, ics_interval=10)).records.layers
    ics, cos = layers["ics"].reshape(20, 3), layers["ics_cos"].reshape(20, 3)
    measured = layers["step"].reshape(20, 3)[:, 0] % 10 == 1
    assert (ics[measured, 0] == 0).all() and (cos[measured, 0] == 1).all()
    assert (ics[measured, 1:] > 0).all() and (np.abs(cos[measured, 1:]) <= 1 + 1e-6).all()
    assert np.isnan(ics[~measured]).all() and np.isnan(cos[~measured]).all()


def test_ics_equals_an_independent_recomputation():
    cfg = small_config(steps=1, ics_interval=1, optim={"lr": 0.2})
    measured = train(cfg).records.layers["ics"]
    t = Trainer(cfg)  # same seed: same initialization and first batch
    x, y = t.next_batch()
    at_t = copy.deepcopy(t.model)
    loss = t.loss_fn(t.model(x), y)
    loss.backward()
    grads = [b.layer.weight.grad.clone() for _, b in t.model.blocks()]
    t.optimizer.step()
    expected = [0.0]
    for i in range(1, 3):
        m = copy.deepcopy(at_t)  # W^t everywhere, then the blocks below i at W^{t+1}
        for j in range(i):
            getattr(m, f"block{j}").load_state_dict(getattr(t.model, f"block{j}").state_dict())
        getattr(m, f"block{i}").layer.weight.grad = None
        t.loss_fn(m(x), y).backward()
        expected.append(float((grads[i] - getattr(m, f"block{i}").layer.weight.grad).norm()))
    np.testing.assert_allclose(measured, expected, rtol=1e-4, atol=1e-7)


def test_landscape_equals_the_loss_at_each_step_size_and_leaves_the_model():
    t = Trainer(small_config(steps=1))
    x, y = t.probe_batch, t.probe_labels
    state = copy.deepcopy(t.model.state_dict())
    out = landscape(t.model, t.loss_fn, x, y, [0.1, 1.0])
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    losses = []
    for eta in (0.0, 0.1, 1.0):
        m = copy.deepcopy(t.model)
        m.zero_grad()
        t.loss_fn(m(x), y).backward()
        with torch.no_grad():
            for p in m.parameters():
                p.sub_(p.grad, alpha=eta)
        losses.append(float(t.loss_fn(m(x), y).detach()))
    assert out["landscape_loss_min"] == pytest.approx(min(losses), rel=1e-4)
    assert out["landscape_loss_max"] == pytest.approx(max(losses), rel=1e-4)
    assert out["grad_change"] > 0 and out["beta_smoothness"] > 0


def test_ics_interval_must_be_a_multiple_of_stats_interval():
    with pytest.raises(ConfigError, match="ics_interval=15 must be a multiple of stats_interval"):
        parse_config({"stats_interval": 10, "ics_interval": 15})


def test_the_metrics_api_knows_the_new_statistics():
    from server.errors import BadRequest
    from server.service.records import per_layer as _check_stat

    assert _check_stat("ics") and _check_stat("ics_cos") and _check_stat("layer_bias_grad_norm")
    assert not _check_stat("beta_smoothness") and not _check_stat("landscape_loss_range")
    with pytest.raises(BadRequest, match="beta_smoothness"):  # the error lists them
        _check_stat("nope")


def test_noisy_bn_ics_without_a_parameter_update_is_zero():
    """ICS compares G and G' on the same batch under the same noise (one step's draw): with no
    update in between there is no shift at all, however noisy the BN."""
    from bncore.nn.norms import new_noise
    from bncore.run.landscape import internal_covariate_shift

    t = Trainer(
        small_config(steps=1, norm={"kind": "noisy", "noise_shift": 0.5, "noise_scale": 1.5})
    )
    x, y = t.next_batch()
    new_noise(t.model)
    t.loss_fn(t.model(x), y).backward()
    blocks = [b for _, b in t.model.blocks()]
    before = [b.layer.weight.grad.detach().clone() for b in blocks]
    dist, cos = internal_covariate_shift(t.model, t.loss_fn, x, y, blocks, before, lambda: None)
    assert dist.abs().max() == 0 and torch.allclose(cos, torch.ones_like(cos))
    new_noise(t.model)  # the next step's noise: now the same weights give another gradient
    dist, _ = internal_covariate_shift(t.model, t.loss_fn, x, y, blocks, before, lambda: None)
    assert dist[1:].min() > 0

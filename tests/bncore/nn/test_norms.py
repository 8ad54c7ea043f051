"""Normalization variants: each equals its definition (or plain BN at its limit), plugs into the
run config, trains and is recorded like BN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bncore.nn.norms import BatchRenorm, GhostBatchNorm, NoisyBatchNorm
from bncore.run.config import ConfigError, parse_config
from bncore.run.engine import train
from bncore.run.models import build_model
from tests.helpers import small_config


def _pair(layer: nn.Module, shape: tuple[int, ...], seed: int = 0):
    """``layer`` and torch's BN from the same state, and an input of ``shape``."""
    torch.manual_seed(seed)
    c = shape[1]
    ref = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(c)
    with torch.no_grad():
        for m in (layer, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, c))
            m.bias.copy_(torch.linspace(-1.0, 1.0, c))
            m.running_mean.copy_(torch.linspace(-0.3, 0.3, c))
            m.running_var.copy_(torch.linspace(0.5, 1.5, c))
    x = torch.randn(shape) * 3 + 1
    return layer, ref, x


def _same_step(layer: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Forward, backward and running buffers of ``layer`` equal ``ref``'s on ``x``."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 5), (8, 3, 4, 4)])
def test_renorm_at_r_max_1_d_max_0_is_batch_norm(shape):
    _same_step(*_pair(BatchRenorm(shape[1], r_max=1.0, d_max=0.0), shape))


def test_renorm_corrects_towards_the_running_statistics():
    layer, _, x = _pair(BatchRenorm(4, r_max=100.0, d_max=100.0), (64, 4))
    # r and d as large as needed: the output is what eval mode gives, with the old buffers
    expected = layer.eval()(x)
    y = layer.train()(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(16, 5), (8, 3, 4, 4)])
def test_ghost_bn_over_one_virtual_batch_is_batch_norm(shape):
    _same_step(*_pair(GhostBatchNorm(shape[1], virtual_batch=shape[0]), shape))


def test_ghost_bn_normalizes_each_virtual_batch_on_its_own():
    layer = GhostBatchNorm(3, virtual_batch=4, affine=False)
    x = torch.randn(12, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.arange(12.0)[:, None]
    y = layer(x)
    for part in y.split(4):
        torch.testing.assert_close(part.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(part.var(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    # the running mean moved towards the virtual batches' average mean (0.1 of the way)
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(0))


def test_noisy_bn_moves_each_step_holds_within_one_and_evaluates_as_bn():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6)
    layer = NoisyBatchNorm(bn, noise_shift=0.5, noise_scale=1.5)
    x = torch.randn(4096, 6)
    a = layer(x)
    torch.testing.assert_close(layer(x), a)  # one step: the same noise for every pass
    layer.new_step()
    b = layer(x)
    assert not torch.allclose(a, b)  # a new step: new noise
    clean = bn(x)
    # per channel, a mean and a scale of this step (mu in [-0.5, 0.5], sigma in [1, 1.5]) ...
    mean, std = b.mean(0), b.std(0, unbiased=False) / clean.std(0, unbiased=False)
    assert (mean.abs() <= 0.5 + 0.05).all() and mean.abs().max() > 0.01
    assert (std >= 1 - 0.05).all() and (std <= (1.5**2 + 0.25) ** 0.5 + 0.05).all()
    # ... and noise on each activation of each sample: not a function of the channel alone
    residual = b - clean * (b - mean).std(0) / clean.std(0) - mean
    assert residual.std() > 0.3
    assert not torch.allclose(a.mean(0), b.mean(0), atol=0.05)  # the distribution moved
    layer.eval(), bn.eval()
    torch.testing.assert_close(layer(x), bn(x))
    assert layer.running_mean is bn.running_mean and layer.weight is bn.weight


@pytest.mark.parametrize(
    ("norm", "cls", "groups"),
    [({"kind": "group", "groups": 4}, nn.GroupNorm, 4), ({"kind": "layer"}, nn.GroupNorm, 1),
     ({"kind": "group"}, nn.GroupNorm, 6), ({"kind": "ghost"}, GhostBatchNorm, None),
     ({"kind": "renorm"}, BatchRenorm, None), ({"kind": "noisy"}, NoisyBatchNorm, None)],
)  # fmt: skip
def test_each_kind_builds_trains_and_is_recorded(norm, cls, groups):
    cfg = small_config(steps=40, norm=norm)
    block = build_model(cfg, (64,), 10).block0
    assert isinstance(block.norm, cls)
    if groups is not None:
        assert block.norm.num_groups == groups
    assert block.layer.bias is None  # a normalization follows: its bias would be cancelled
    result = train(cfg)
    assert result.status == "completed"
    loss = result.records.steps["loss"]
    assert loss[-10:].mean() < 0.7 * loss[:10].mean()
    layers = result.records.layers
    assert len(layers["step"]) == 40 * 3
    for col in ("pre_var", "post_var", "act_var", "grad_in_norm", "grad_out_norm", "gamma"):
        assert np.isfinite(layers[col]).all(), col
    has_running = cls is not nn.GroupNorm
    assert np.isfinite(layers["running_mean_gap"]).all() == has_running


def test_ghost_virtual_batch_defaults_to_a_divisor_of_the_batch():
    cfg = small_config(batch_size=48, norm={"kind": "ghost"})
    assert build_model(cfg, (64,), 10).block0.norm.virtual_batch == 24


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"norm": {"kind": "group", "groups": 5}}, "norm.groups"),
        ({"norm": {"kind": "group", "groups": 24}}, "norm.groups"),
        ({"norm": {"kind": "ghost", "virtual_batch": 10}}, "norm.virtual_batch"),
        ({"norm": {"kind": "ghost", "virtual_batch": 1}}, "norm.virtual_batch"),
        ({"norm": {"kind": "renorm", "r_max": 0.5}}, "norm.r_max"),
        ({"norm": {"kind": "noisy", "noise_scale": 0.5}}, "norm.noise_scale"),
        ({"norm": {"kind": "instance"}}, "norm.kind"),
    ],
)
def test_bad_variant_settings_name_the_field(over, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config({"model": {"width": 24}, "batch_size": 32, **over})

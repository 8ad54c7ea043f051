"""Measured against the literature's closed forms, on small networks at initialization."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bncore.run.config import parse_config
from bncore.run.engine import train
from bncore.run.models import build_model
from bncore.science.theory import (
    gradient_explosion_rate,
    gradient_growth_rate,
    gradient_growth_uncertainty,
    mean_field_rate,
)

DEPTH = 24


def _at_init(activation: str, batch_size: int) -> dict[str, np.ndarray]:
    """Records of 10 steps that leave the weights where they started (lr 1e-9)."""
    cfg = parse_config(
        {
            "model": {"depth": DEPTH, "width": 256, "activation": activation},
            "data": {"name": "digits"},  # 64 features: the batch spans B - 1 directions
            "batch_size": batch_size,
            "steps": 10,
            "eval_interval": 10,
            "channel_interval": 1000,
            "optim": {"lr": 1e-9, "momentum": 0.0},
        }
    )
    return train(cfg).records.layers


@pytest.mark.parametrize(("activation", "batch_size"), [("linear", 8), ("linear", 16),
                                                        ("relu", 256)])  # fmt: skip
def test_gradient_explosion_rate_matches_yang_et_al(activation, batch_size):
    measured = gradient_growth_rate(_at_init(activation, batch_size), DEPTH)
    theory = gradient_explosion_rate(activation, batch_size)
    assert measured == pytest.approx(theory, rel=0.1)
    # and closer than the neighbouring batch size's prediction would be
    if activation == "linear":
        other = gradient_explosion_rate(activation, batch_size * 2 if batch_size < 16 else 8)
        assert abs(measured - theory) < abs(measured - other)


def test_closed_forms_and_the_finite_batch_relu_rate():
    assert gradient_explosion_rate("linear", 8) == pytest.approx(1.2)
    # ReLU at finite B: torch.nn measured (width 512, depth 30) 1.789 / 1.584 / 1.525 / 1.491 /
    # 1.472 at B = 8 / 16 / 32 / 64 / 128; Yang et al. give 1.788 at 8, 1.522 at 32, 1.480 at 128
    relu = [gradient_explosion_rate("relu", b) for b in (8, 16, 32, 64, 128)]
    np.testing.assert_allclose(relu, [1.789, 1.584, 1.525, 1.491, 1.472], rtol=0.02)
    assert all(a > b for a, b in itertools.pairwise(relu)) and relu[-1] > math.pi / (math.pi - 1)
    # the same computation for a linear network gives the closed form
    for b in (8, 16, 64):
        assert mean_field_rate("linear", b) - 1 == pytest.approx((b - 2) / (b - 3) - 1, rel=0.05)
    with pytest.raises(ValueError, match="batch_size > 3"):
        gradient_explosion_rate("linear", 3)
    with pytest.raises(ValueError, match="tanh"):
        gradient_explosion_rate("tanh", 64)


def test_growth_rate_of_a_known_geometric_profile():
    depth, rate = 10, 1.3
    norms = np.sqrt(rate ** -np.arange(depth, dtype=float))  # ||g_l||^2 = rate^-l
    layers = {"grad_in_norm": np.tile(norms, 3)}
    assert gradient_growth_rate(layers, depth) == pytest.approx(rate)
    with pytest.raises(ValueError, match="whole steps"):
        gradient_growth_rate({"grad_in_norm": norms[:7]}, depth)


@pytest.mark.parametrize("kind", ["batch", "ghost", "renorm"])
def test_bn_cancels_the_gradient_of_the_bias_before_it(kind):
    cfg = parse_config({"model": {"depth": 3, "width": 32, "bias": True}, "norm": {"kind": kind},
                        "batch_size": 32})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, (64,), 10)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for _, block in model.blocks():
        weight, bias = block.layer.weight.grad, block.layer.bias.grad
        assert weight.abs().max() > 1e-4  # the layer does learn
        assert bias.abs().max() < 1e-6 * max(1.0, float(weight.abs().max()))


def test_the_recorded_bias_gradient_is_zero_before_bn_and_not_after():
    def recorded(placement: str) -> np.ndarray:
        cfg = parse_config({"model": {"depth": 3, "width": 32, "bias": True},
                            "data": {"name": "digits"}, "steps": 20,
                            "norm": {"placement": placement}})  # fmt: skip
        return train(cfg).records.layers["layer_bias_grad_norm"]

    before, after = recorded("before_activation"), recorded("after_activation")
    assert (before < 1e-5).all() and (after > 1e-3).all()


def _digits_mlp(kind: str, batch_size: int, seed: int) -> float:
    """Test accuracy after one epoch of digits, learning rate linear in the batch (Wu & He)."""
    steps = 1438 // batch_size
    lr = 0.1 * batch_size / 32
    cfg = parse_config({"model": {"depth": 3, "width": 64}, "data": {"name": "digits"},
                        "norm": {"kind": kind}, "batch_size": batch_size, "seed": seed,
                        "steps": steps, "eval_interval": steps, "stats_interval": 20,
                        "channel_interval": 100, "optim": {"lr": lr}})  # fmt: skip
    return train(cfg).final["test_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_bn_degrades_at_batch_2_while_groupnorm_does_not(seed):
    bn2, gn2, bn16 = (_digits_mlp(k, b, seed) for k, b in (("batch", 2), ("group", 2),
                                                            ("batch", 16)))  # fmt: skip
    assert bn16 > bn2 + 0.3  # BN itself is fine at batch 16
    assert gn2 > bn2 + 0.2  # at batch 2 GroupNorm still learns, BN does not


def test_the_growth_rate_s_uncertainty_is_its_batch_noise_and_its_drift_with_depth():
    depth_from_out = np.arange(24)[::-1].astype(np.float64)
    geometric = np.exp(depth_from_out * np.log(1.2) / 2) * np.ones((10, 1))
    assert gradient_growth_uncertainty(geometric) < 1e-12  # one rate at every depth, no noise
    rng = np.random.default_rng(0)
    noisy = geometric * np.exp(rng.normal(0, 0.05, geometric.shape))
    assert 1e-4 < gradient_growth_uncertainty(noisy) < 0.02
    bent = np.exp((depth_from_out * np.log(1.2) + 0.002 * (depth_from_out - 12) ** 2) / 2)
    drift = gradient_growth_uncertainty(bent * np.ones((10, 1)))
    assert drift > 0.01  # the local rate changes by 0.004 per block through 20 blocks

"""The by-product statistics each BN layer leaves behind, against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

import bncore
from bncore.nn.byproducts import BNStats
from tests.helpers import channel_dims


@pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((64, 16), False),
        ((8, 6, 40), False),
        ((4, 5, 6, 7), False),
        ((4, 5, 6, 7), True),
        ((3, 300, 2), False),
    ],
)
def test_stats_equal_independent_recomputation(kernel: str, shape, channels_last):
    gen = torch.Generator().manual_seed(9)
    c = shape[1]
    layer = (bncore.BatchNorm2d if len(shape) == 4 else bncore.BatchNorm1d)(c, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    dims = channel_dims(x)
    s = layer.stats
    # forward: the batch statistics that normalized
    torch.testing.assert_close(s.mean, x.detach().mean(dims))
    torch.testing.assert_close(s.var, x.detach().var(dims, correction=0))
    # backward: the sums behind dgamma/dbeta, and the squared gradient norms
    xhat = (x.detach() - x.detach().mean(dims, keepdim=True)) / torch.sqrt(
        x.detach().var(dims, correction=0, keepdim=True) + layer.eps
    )
    torch.testing.assert_close(s.sum_dy, dy.sum(dims))
    torch.testing.assert_close(s.sum_dy_xhat, (dy * xhat).sum(dims))
    torch.testing.assert_close(s.dy_sq, dy.square().sum(dims))
    torch.testing.assert_close(s.dx_sq, dx.square().sum(dims))
    assert s.steps == 1
    for t in (s.mean, s.var, s.sum_dy, s.sum_dy_xhat, s.dy_sq, s.dx_sq):
        assert t.shape == (c,) and not t.requires_grad and t.device == x.device


def test_stats_follow_each_step_and_skip_eval(kernel: str):
    layer = bncore.BatchNorm1d(3)
    for i in range(3):
        x = torch.randn(10, 3) + 10 * i
        layer(x).sum().backward()
        torch.testing.assert_close(layer.stats.mean, x.mean(0))
        torch.testing.assert_close(layer.stats.sum_dy, torch.full((3,), 10.0))
    assert layer.stats.steps == 3
    layer.eval()
    layer(torch.randn(10, 3) - 100)  # eval: running statistics, nothing recorded
    assert layer.stats.steps == 3
    torch.testing.assert_close(layer.stats.mean, x.mean(0))


def test_stats_do_not_keep_the_graph_alive(kernel: str):
    layer = bncore.BatchNorm1d(3)
    x = torch.randn(10, 3, requires_grad=True)
    layer(x).sum().backward()
    assert layer.stats.mean.grad_fn is None and layer.stats.sum_dy.grad_fn is None


def test_stats_recorded_through_functional_api(kernel: str):
    stats = BNStats()
    x = torch.randn(6, 2, 5, requires_grad=True)
    y = bncore.nn.functional.batch_norm_with_stats(x, None, None, training=True, stats=stats)
    y.pow(2).sum().backward()
    torch.testing.assert_close(stats.var, x.detach().var((0, 2), correction=0))
    torch.testing.assert_close(stats.dy_sq, (2 * y.detach()).square().sum((0, 2)))
    stats.clear()
    assert stats.mean is None and stats.grad is None and stats.steps == 0


def test_gradient_sums_are_nan_until_the_backward_runs(kernel: str):
    layer = bncore.BatchNorm1d(3)
    y = layer(torch.randn(10, 3, requires_grad=True))
    assert torch.isnan(layer.stats.grad).all()
    y.sum().backward()
    assert not torch.isnan(layer.stats.grad).any()


def test_gradient_sums_survive_gradient_accumulation(kernel: str):
    """Parameter grads are copies: accumulating into .grad leaves each step's record alone."""
    layer = bncore.BatchNorm1d(3)
    x = torch.randn(10, 3)
    layer(x).sum().backward()
    first = layer.stats.grad.clone()
    record = layer.stats.grad
    layer(x).mul(3).sum().backward()  # accumulates into weight.grad / bias.grad
    torch.testing.assert_close(record, first, equal_nan=True)
    torch.testing.assert_close(layer.bias.grad, torch.full((3,), 40.0))


@pytest.mark.parametrize(
    "shape,channels_last",
    [
        ((128, 32), False),
        ((6, 5, 70), False),
        ((8, 6, 5, 5), True),
        ((3, 4, 5000), False),
        ((70, 6, 3, 3), False),
        ((5, 700, 4, 5), False),
    ],
)
@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("lo,hi", [(0.0, 1.5), (0.0, math.inf), (-math.inf, math.inf)])
def test_activation_statistics_from_the_forward(kernel: str, shape, channels_last, kind, lo, hi):
    """Asked to, BN measures the ReLU (or identity) that follows, in its normalize pass."""
    from bncore.nn.byproducts import Recording
    from bncore.nn.kernels.reference import ActivationStats, activation_stats

    layer = (bncore.BatchNorm2d if len(shape) == 4 else bncore.BatchNorm1d)(shape[1])
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    x = torch.randn(shape) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    spec = ActivationStats(kind, lo, hi)
    layer.record_to(Recording(spec))
    y = layer(x)
    expected = activation_stats(y.detach(), spec)
    torch.testing.assert_close(layer.stats.act, expected, rtol=1e-4, atol=1e-5)
    layer.record_to(None)
    layer(x)
    assert layer.stats.act is None  # not asked: not measured


@pytest.mark.parametrize("shape", [(64, 16), (4, 3, 300), (80, 3, 4)])
@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("lo", [-math.inf, 0.0])
def test_activation_statistics_of_infinite_outputs(kernel: str, shape, kind, lo):
    """Outputs that overflow to +-inf: ReLU(-inf) is 0, and they are what a tail at +-inf
    counts (the fused kernel sums such a channel again, exactly)."""
    from bncore.nn.byproducts import Recording
    from bncore.nn.kernels.reference import ActivationStats, activation_stats

    layer = bncore.BatchNorm1d(shape[1])
    with torch.no_grad():
        layer.weight[0] = 3e38  # channel 0 overflows beyond about 1.1 standard deviations
    spec = ActivationStats(kind, lo, math.inf)
    layer.record_to(Recording(spec))
    y = layer(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    assert (y[:, 0] == math.inf).any() and (y[:, 0] == -math.inf).any()
    assert y[:, 1:].isfinite().all()
    expected = activation_stats(y.detach(), spec)
    assert expected[3, 0] > 0 and (expected[2, 0] > 0) == (kind == 1 or lo == 0)
    torch.testing.assert_close(layer.stats.act, expected, rtol=1e-4, atol=1e-5, equal_nan=True)

"""Running statistics: PyTorch's update rule, and Ioffe & Szegedy's inference statistics."""

from __future__ import annotations

import pytest
import torch

import bncore


@pytest.mark.parametrize("shape", [(12, 5), (6, 5, 4), (3, 5, 2, 4)])
def test_cumulative_average_is_ioffe_szegedy_inference_statistics(kernel: str, shape):
    """momentum=None: after K batches of m values, E[x] is the mean of the batch means and
    Var[x] is m/(m-1) times the mean of the (biased) batch variances (Algorithm 2)."""
    layer = bncore.BatchNorm2d if len(shape) == 4 else bncore.BatchNorm1d
    bn = layer(shape[1], momentum=None, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    dims = [d for d in range(len(shape)) if d != 1]
    means, variances = [], []
    k = 9
    for i in range(k):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (i + 1) + i
        bn(x)
        means.append(x.mean(dims))
        variances.append(x.var(dims, correction=0))
    m = x.numel() // shape[1]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-6, atol=1e-6)
    expected_var = m / (m - 1) * torch.stack(variances).mean(0)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-6, atol=1e-6)
    assert int(bn.num_batches_tracked) == k


def test_exponential_update_rule(kernel: str):
    bn = bncore.BatchNorm1d(3, momentum=0.25, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    for _ in range(5):
        x = torch.randn(10, 3, generator=gen, dtype=torch.float64) * 2 + 1
        bn(x)
        rm = 0.75 * rm + 0.25 * x.mean(0)
        rv = 0.75 * rv + 0.25 * x.var(0, correction=1)
    torch.testing.assert_close(bn.running_mean, rm)
    torch.testing.assert_close(bn.running_var, rv)


def test_eval_mode_uses_running_stats_and_does_not_update(kernel: str):
    bn = bncore.BatchNorm1d(3, dtype=torch.float64)
    bn(torch.randn(20, 3, dtype=torch.float64) * 3 + 2)
    bn.eval()
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = torch.randn(5, 3, dtype=torch.float64)
    y = bn(x)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(y, expected * bn.weight + bn.bias)
    torch.testing.assert_close(bn.running_mean, before[0])
    torch.testing.assert_close(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


def test_untracked_layer_uses_batch_stats_in_eval(kernel: str):
    bn = bncore.BatchNorm1d(3, track_running_stats=False).eval()
    assert bn.running_mean is None and bn.num_batches_tracked is None
    x = torch.randn(9, 3) * 4 + 1
    y = bn(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert bn.stats.mean is not None  # batch statistics were computed, so they are recorded


def test_reset(kernel: str):
    bn = bncore.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.fill_(2)
    bn(torch.randn(8, 3) + 5)
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.weight, torch.full((3,), 2.0))
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.ones(3)) and torch.equal(bn.bias, torch.zeros(3))

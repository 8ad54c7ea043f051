"""Gradients checked numerically (float64): first order for every kernel, second order too."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bncore
from bncore.nn.functional import batch_norm

SHAPES = [(6, 3), (4, 3, 5), (3, 2, 3, 4)]


def _inputs(shape: tuple[int, ...], affine: bool):
    gen = torch.Generator().manual_seed(11)
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    w = (
        (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        if affine
        else None
    )
    b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_training(kernel: str, shape, affine):
    x, w, b = _inputs(shape, affine)
    args = (x, w, b) if affine else (x,)

    def f(x, w=None, b=None):
        return batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    assert gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_channels_last(kernel: str, shape):
    if len(shape) != 4:
        pytest.skip("channels_last is 4-d")
    x, w, b = _inputs(shape, True)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()

    def f(x, w, b):
        return batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    assert gradcheck(f, (xc, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_eval_mode(kernel: str):
    x, w, b = _inputs((5, 3, 4), True)
    rm = torch.randn(3, dtype=torch.float64)
    rv = torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape", SHAPES)
def test_gradgradcheck_training(kernel: str, shape):
    x, w, b = _inputs(shape, True)

    def f(x, w, b):
        return batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    assert gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_double_backward_matches_torch(kernel: str):
    """A gradient penalty (create_graph) gives torch's second-order gradients."""
    x, w, b = _inputs((6, 4, 3), True)
    results = []
    for fn in (torch.nn.functional.batch_norm, bncore.nn.functional.batch_norm):
        y = fn(x, None, None, w, b, True, 0.1, 1e-3)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (x, w, b)))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref)


def test_input_without_grad_still_gives_parameter_grads(kernel: str):
    layer = bncore.BatchNorm1d(4, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64)
    dy = torch.randn(8, 4, dtype=torch.float64)
    g1 = torch.autograd.grad(ref(x), (ref.weight, ref.bias), dy)
    g2 = torch.autograd.grad(layer(x), (layer.weight, layer.bias), dy)
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.isnan(layer.stats.dx_sq).all()  # dx was never computed
    assert not torch.isnan(layer.stats.dy_sq).any()


def test_graph_misuse_is_caught_as_torch_does(kernel: str):
    """The saved input is version-checked, and a freed graph cannot be walked twice."""
    layer = bncore.BatchNorm1d(4, dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x * 1)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()
    h = x * 1
    y = layer(h)
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.pow(2).sum().backward()


def test_grad_of_the_weight_alone(kernel: str):
    """autograd.grad for gamma only: torch's value (the fused kernel skips dx on the way)."""
    layer = bncore.BatchNorm1d(4, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(8, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad(layer(x), layer.weight, dy)
    (theirs,) = torch.autograd.grad(ref(x), ref.weight, dy)
    torch.testing.assert_close(ours, theirs)
    if kernel == "cpu":
        assert torch.isnan(layer.stats.dx_sq).all()
    assert x.grad is None and layer.bias.grad is None


def test_forward_mode_ad_is_a_clear_error(kernel: str):
    import torch.autograd.forward_ad as fwAD

    layer = bncore.BatchNorm1d(4, dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises((RuntimeError, NotImplementedError), match="forward"):
        layer(fwAD.make_dual(x, torch.randn_like(x)))

"""bncore.BatchNorm{1,2,3}d against torch.nn's, over a randomized grid of settings and steps."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
from torch import nn

import bncore

TOL = {torch.float64: dict(rtol=1e-6, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-4)}

SHAPES = [(8, 5), (16, 3, 7), (4, 6, 5, 3), (3, 4, 2, 3, 5), (32, 64), (5, 8, 300)]
PAIRS = {
    2: (nn.BatchNorm1d, bncore.BatchNorm1d),
    3: (nn.BatchNorm1d, bncore.BatchNorm1d),
    4: (nn.BatchNorm2d, bncore.BatchNorm2d),
    5: (nn.BatchNorm3d, bncore.BatchNorm3d),
}


def _grid() -> list[tuple]:
    """A fixed random sample of the full grid, so every axis is covered in a bounded run."""
    full = list(
        itertools.product(
            SHAPES,
            [0.1, 0.35, None],
            [True, False],
            [True, False],
            [True, False],
            [torch.float64, torch.float32],
            [False, True],
        )
    )
    rng = random.Random(0)
    return rng.sample(full, 48)


def _assert_close(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype, what: str):
    assert (a is None) == (b is None), what
    if a is not None:
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    "shape,momentum,affine,track,bias,dtype,channels_last",
    _grid(),
    ids=lambda v: str(v).replace("torch.", "").replace(" ", ""),
)
def test_matches_torch_over_training_and_eval(
    kernel: str, shape, momentum, affine, track, bias, dtype, channels_last
):
    if channels_last and len(shape) != 4:
        channels_last = False
    torch_cls, our_cls = PAIRS[len(shape)]
    c = shape[1]
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    ref = torch_cls(c, eps=1e-5, bias=bias, **kw)
    ours = our_cls(c, eps=1e-5, bias=bias, **kw)
    if affine:  # non-trivial gamma/beta
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if bias:
                ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, momentum, affine)).encode()))
    for step in range(12):
        train = step % 4 != 3  # switch to eval every fourth step
        ref.train(train)
        ours.train(train)
        x = torch.randn(shape, generator=gen, dtype=dtype) * (1 + step) + step - 3
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ref(x1), ours(x2)
        _assert_close(y2, y1, dtype, f"output at step {step}")
        params1 = [p for p in (x1, ref.weight, ref.bias) if p is not None]
        params2 = [p for p in (x2, ours.weight, ours.bias) if p is not None]
        g1 = torch.autograd.grad(y1, params1, dy)
        g2 = torch.autograd.grad(y2, params2, dy)
        for name, a, b in zip(["input", "weight", "bias"], g2, g1, strict=False):
            _assert_close(a, b, dtype, f"{name} gradient at step {step}")
        _assert_close(ours.running_mean, ref.running_mean, dtype, f"running_mean at {step}")
        _assert_close(ours.running_var, ref.running_var, dtype, f"running_var at {step}")
        if track:
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        if channels_last and train:
            assert y2.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_computes_in_float32(kernel: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 6, 5, 5, generator=gen) * 3 + 2).to(dtype)
    ref, ours = nn.BatchNorm2d(6), bncore.BatchNorm2d(6)
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        y1, y2 = ref(x), ours(x)
        assert y2.dtype == dtype
        torch.testing.assert_close(y2.float(), y1.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=1e-3)
    # float32 statistics inside: the batch mean is that of the half values, computed in float32
    torch.testing.assert_close(ours.stats.mean, x.float().mean((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_functional_matches_torch_functional(kernel: str):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    rm1, rv1 = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    for training, momentum in [(True, 0.1), (True, 0.7), (False, 0.1), (True, 0.0)]:
        y1 = torch.nn.functional.batch_norm(x, rm1, rv1, w, b, training, momentum, 1e-3)
        y2 = bncore.nn.functional.batch_norm(x, rm2, rv2, w, b, training, momentum, 1e-3)
        torch.testing.assert_close(y2, y1)
        torch.testing.assert_close(rm2, rm1)
        torch.testing.assert_close(rv2, rv1)
        g1 = torch.autograd.grad(y1.square().sum(), (x, w, b))
        g2 = torch.autograd.grad(y2.square().sum(), (x, w, b))
        for a, c in zip(g2, g1, strict=True):
            torch.testing.assert_close(a, c)


def test_training_without_running_buffers(kernel: str):
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    y1 = torch.nn.functional.batch_norm(x, None, None, training=True)
    y2 = bncore.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y2, y1)


def test_empty_batch_leaves_buffers_untouched(kernel: str):
    layer = bncore.BatchNorm1d(3)
    y = layer(torch.randn(0, 3, 4))
    assert y.shape == (0, 3, 4)
    torch.testing.assert_close(layer.running_mean, torch.zeros(3))
    torch.testing.assert_close(layer.running_var, torch.ones(3))


def test_non_contiguous_input(kernel: str):
    base = torch.randn(6, 8, 10, dtype=torch.float64)
    x = base.transpose(0, 2)[:, ::2]  # (10, 4, 6) with odd strides
    ref, ours = nn.BatchNorm1d(4, dtype=torch.float64), bncore.BatchNorm1d(4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)

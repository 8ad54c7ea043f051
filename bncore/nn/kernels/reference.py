r"""The batch-norm math written out in torch operations: the readable reference.

Input ``x`` has shape ``(N, C, *)``: channel ``c`` is normalized over its ``m = N * L`` values,
where ``L`` is the product of the trailing sizes (1 for ``(N, C)`` input, ``H * W`` for images).
The math works on the ``(N, C, L)`` view :func:`ncl_view`.

Forward, per channel:

.. math::
    \mu = \frac{1}{m}\sum x, \qquad \sigma^2 = \frac{1}{m}\sum (x - \mu)^2, \qquad
    \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta

Backward, per channel (closed form):

.. math::
    \frac{\partial L}{\partial \beta} = \sum dy, \qquad
    \frac{\partial L}{\partial \gamma} = \sum dy\,\hat x, \qquad
    dx = \frac{\gamma}{m\sqrt{\sigma^2+\epsilon}}\Big(m\,dy - \sum dy - \hat x \sum dy\,\hat x\Big)

The fast kernels (``cpu``, ``compiled``) must agree with these functions; the tests hold them to
it. These functions are also differentiable in torch's sense, which is how double backward works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from bncore.nn.byproducts import RECORD_ROWS, RELU, ActivationStats, RecordTarget

NAME = "reference"
REDUCE_DIMS = (0, 2)


class Running(NamedTuple):
    """Running buffers to move towards the batch statistics, in place, during a forward.

    ``momentum`` may be a 0-d tensor (the cumulative average's 1/k, kept on the device);
    ``unbiased`` feeds the unbiased batch variance m/(m-1) * var to ``var`` (torch), else the
    biased one (Keras).
    """

    mean: Tensor
    var: Tensor
    momentum: float | Tensor
    unbiased: bool = True


def activation_stats(y: Tensor, act: ActivationStats) -> Tensor:
    """:func:`channel_moments` of act(y), the reference for what the fused forward returns."""
    a = torch.relu(y) if act.kind == RELU else y
    return channel_moments(a, act.lo, act.hi)


class Forward(NamedTuple):
    """What a training-mode forward produces; statistics are per channel, in float32 or wider."""

    y: Tensor
    mean: Tensor
    var: Tensor  # biased: the one that normalizes
    invstd: Tensor


class Backward(NamedTuple):
    """Gradients and the per-channel sums the backward computes anyway."""

    dx: Tensor | None
    sum_dy_xhat: Tensor  # = dL/dgamma
    sum_dy: Tensor  # = dL/dbeta
    dy_sq: Tensor  # sum dy^2
    dx_sq: Tensor | None  # sum dx^2


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the statistics are computed in: float32 for half types, as torch does."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def ncl_view(x: Tensor) -> Tensor:
    """The (N, C, L) view of an (N, C, *) tensor (a copy only where no view exists)."""
    return x.unsqueeze(2) if x.dim() == 2 else x.flatten(2)


def values_per_channel(x: Tensor) -> int:
    """m: how many values each channel's statistics are taken over."""
    return x.numel() // x.shape[1]


def _col(v: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against (N, C, L)."""
    return v[:, None]


def batch_stats(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance (two passes, so no cancellation)."""
    x = x3.to(opmath_dtype(x3.dtype))
    mean = x.mean(dim=REDUCE_DIMS)
    var = (x - _col(mean)).square().mean(dim=REDUCE_DIMS)
    return mean, var


def normalize(
    x3: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """y = gamma * (x - mean) * invstd + beta, in opmath, returned in the input's dtype."""
    x = x3.to(mean.dtype)
    y = (x - _col(mean)) * _col(invstd)
    if weight is not None:
        y = y * _col(weight.to(mean.dtype))
    if bias is not None:
        y = y + _col(bias.to(mean.dtype))
    return y.to(x3.dtype)


def update_running(running: Running, mean: Tensor, var: Tensor, m: int) -> None:
    """r <- (1 - momentum) * r + momentum * batch statistic, for the mean and the variance."""
    with torch.no_grad():
        batch_var = var * (m / (m - 1)) if running.unbiased else var
        running.mean.lerp_(mean.to(running.mean.dtype), running.momentum)
        running.var.lerp_(batch_var.to(running.var.dtype), running.momentum)


def normalize_batch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Forward:
    """Normalize ``x`` with its own batch statistics (no side effects)."""
    x3 = ncl_view(x)
    mean, var = batch_stats(x3)
    invstd = torch.rsqrt(var + eps)
    return Forward(normalize(x3, mean, invstd, weight, bias).view(x.shape), mean, var, invstd)


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: Running | None = None,
    normalize: Callable[[Tensor, Tensor | None, Tensor | None, float], Forward] | None = None,
) -> Forward:
    """Training-mode forward: normalize with the batch statistics (``normalize``: another
    implementation of :func:`normalize_batch`), then update ``running``."""
    out = (normalize or normalize_batch)(x, weight, bias, eps)
    if running is not None:
        update_running(running, out.mean, out.var, values_per_channel(x))
    return out


def backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
) -> Backward:
    """The closed-form backward of :func:`forward`, with the by-product sums."""
    acc = mean.dtype
    x3 = ncl_view(x)
    dy3 = dy.reshape(x3.shape).to(acc)
    xhat = (x3.to(acc) - _col(mean)) * _col(invstd)
    m = values_per_channel(x)
    sum_dy = dy3.sum(dim=REDUCE_DIMS)
    sum_dy_xhat = (dy3 * xhat).sum(dim=REDUCE_DIMS)
    dy_sq = dy3.square().sum(dim=REDUCE_DIMS)
    if not need_dx:
        return Backward(None, sum_dy_xhat, sum_dy, dy_sq, None)
    k = invstd if weight is None else weight.to(acc) * invstd
    dx = _col(k / m) * (m * dy3 - _col(sum_dy) - xhat * _col(sum_dy_xhat))
    dx_sq = dx.square().sum(dim=REDUCE_DIMS)
    return Backward(dx.to(dy.dtype).view(x.shape), sum_dy_xhat, sum_dy, dy_sq, dx_sq)


def channel_moments(x: Tensor, lo: float, hi: float) -> Tensor:
    """Per-channel mean, biased variance, and fractions of values <= lo and >= hi of an
    (N, C, *) tensor, as the rows of a (4, C) tensor: what a probe needs of any activation."""
    x3 = ncl_view(x.detach())
    mean, var = batch_stats(x3)
    low = (x3 <= lo).to(mean.dtype).mean(dim=REDUCE_DIMS)
    high = (x3 >= hi).to(mean.dtype).mean(dim=REDUCE_DIMS)
    return torch.stack([mean, var, low, high])


#: Piece kinds of :func:`record_row` (the same numbers as record_cpu.cpp's).
COPY, MEAN_VAR, MOMENTS, UNITS, NORM = range(5)


def record_row(
    out: Tensor,
    tensors: list[Tensor],
    kinds: list[int],
    lo: list[float],
    hi: list[float],
    index: list[Tensor],
    offsets: list[int],
) -> None:
    """Write pieces of a recorded step into the 1-d ``out``, piece i from ``offsets[i]`` on:
    COPY (the values), MEAN_VAR (2C: per-channel mean, variance), MOMENTS (4C:
    :func:`channel_moments`), UNITS (N*k: ``x[:, units, centre]``, n-major, taking the next
    ``index`` tensor), NORM (1: L2)."""
    pieces, units = [], iter(index)
    for t, kind, a, b in zip(tensors, kinds, lo, hi, strict=True):
        t = t.detach()
        if kind == COPY:
            pieces.append(t.reshape(-1))
        elif kind in (MEAN_VAR, MOMENTS):
            m = channel_moments(t, a, b)
            pieces.append((m[:2] if kind == MEAN_VAR else m).reshape(-1))
        elif kind == UNITS:
            pieces.append(units_at(t, next(units)).reshape(-1))
        elif kind == NORM:
            pieces.append(torch.linalg.vector_norm(t).reshape(1))
        else:
            raise ValueError(f"unknown record piece kind {kind}")
    for p, start in zip(pieces, offsets, strict=True):
        out[start : start + p.numel()].copy_(p)


def units_at(x: Tensor, units: Tensor) -> Tensor:
    """``x[:, units]`` at the centre of any trailing dims, (N, k)."""
    v = x.detach().index_select(1, units)
    while v.dim() > 2:
        v = v.select(2, v.shape[2] // 2)
    return v


def write_record(
    target: RecordTarget,
    y: Tensor,
    mean: Tensor,
    var: Tensor,
    running: Running | None,
    weight: Tensor | None,
    bias: Tensor | None,
    act: Tensor | None,
) -> None:
    """What the fused forward writes into a :class:`~bncore.nn.byproducts.RecordTarget`, for
    the other kernels: batch statistics, running buffers, gamma and beta (NaN where absent), ``act``
    if given, NaN gradient sums, and ``y`` at the tracked units."""
    c = mean.numel()
    rows = target.row[: len(RECORD_ROWS) * c].view(len(RECORD_ROWS), c)
    rm, rv = (running.mean, running.var) if running is not None else (None, None)
    values = {"pre_mean": mean, "pre_var": var, "running_mean": rm, "running_var": rv,
              "gamma": weight, "beta": bias}  # fmt: skip
    with torch.no_grad():
        for name, v in values.items():
            i = RECORD_ROWS.index(name)
            if v is None:
                rows[i].fill_(math.nan)
            else:
                rows[i].copy_(v.detach())
        if act is not None:
            target.act.copy_(act)
        target.grad.fill_(math.nan)
        if target.units is not None:
            n = y.shape[0] * target.units.numel()
            start = len(RECORD_ROWS) * c
            target.row[start : start + n].copy_(units_at(y, target.units).reshape(-1))

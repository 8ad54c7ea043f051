r"""Batch normalization as a function, with torch.nn.functional.batch_norm's signature and results.

Training mode normalizes each channel with the batch's own statistics and, when running buffers
are given, updates them in place:

.. math::
    \hat\mu \leftarrow (1 - \text{momentum})\,\hat\mu + \text{momentum}\,\mu_B, \qquad
    \hat\sigma^2 \leftarrow (1 - \text{momentum})\,\hat\sigma^2
        + \text{momentum}\,\tfrac{m}{m-1}\sigma_B^2

(the running variance takes the unbiased batch variance, Ioffe & Szegedy's Algorithm 2; the
output uses the biased one). Eval mode normalizes with the running buffers. The math lives in
:mod:`bncore.nn.kernels`; this module checks inputs, dispatches, and keeps the buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bncore.nn import kernels
from bncore.nn.byproducts import BNStats, Capture
from bncore.nn.kernels import reference
from bncore.nn.kernels.reference import Running

__all__ = ["batch_norm", "batch_norm_with_stats", "eval_batch_norm"]


def _check(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects input of shape (N, C, ...) with at least 2 dimensions, "
            f"got {input.dim()}D input of shape {tuple(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"batch_norm expects a floating-point input, got {input.dtype}")
    channels = input.shape[1]
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None and t.numel() != channels:
            raise ValueError(
                f"{name} should contain {channels} elements (one per channel of input "
                f"{tuple(input.shape)}), not {t.numel()}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together, or both be None")
    if training:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    else:
        if running_mean is None:
            raise ValueError(
                "running_mean must be defined in evaluation mode: pass the running buffers, "
                "or training=True to normalize with the batch statistics"
            )
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def eval_batch_norm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Evaluation mode: normalize with the running buffers, as y = x * scale + shift with
    scale = gamma / sqrt(running_var + eps), in plain (differentiable) torch operations."""
    acc = reference.opmath_dtype(input.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    y = torch.addcmul(shift.view(shape), input.to(acc), scale.view(shape))
    return y.to(input.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    stats: BNStats | None = None,
    unbiased_running_var: bool = True,
) -> Tensor:
    r"""Batch normalization over the channel dimension (dim 1) of ``input`` of shape (N, C, ...).

    Same arguments and results as :func:`torch.nn.functional.batch_norm`: in training mode the
    batch statistics normalize and, if given, ``running_mean``/``running_var`` are updated in
    place with ``momentum``; otherwise the running buffers normalize. Beyond torch's:
    ``stats`` (a :class:`~bncore.nn.byproducts.BNStats`) receives the by-product statistics;
    ``momentum`` may be a 0-d tensor (the cumulative average's 1/k, without a host sync);
    ``unbiased_running_var=False`` feeds the biased batch variance to the running variance, as
    Keras does.
    """
    _check(input, running_mean, running_var, weight, bias, training, eps)
    if not training:
        assert running_mean is not None and running_var is not None
        return eval_batch_norm(input, running_mean, running_var, weight, bias, eps)
    running = None
    if running_mean is not None and running_var is not None:
        running = Running(running_mean, running_var, momentum, unbiased_running_var)
    return kernels.training_batch_norm(input, weight, bias, eps, running, Capture(stats))


#: :func:`batch_norm`, named for what its keyword arguments add.
batch_norm_with_stats = batch_norm

r"""Normalization variants that the BN literature compares against plain batch normalization.

- :class:`GhostBatchNorm` (Hoffer et al. 2017): each virtual batch of ``virtual_batch`` examples
  is normalized with its own statistics, as if the batch were that small.
- :class:`BatchRenorm` (Ioffe 2017): the batch statistics, corrected towards the running ones,

  .. math::
      y = \frac{x - \mu_B}{\sigma_B} r + d, \quad
      r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right), \quad
      d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right)

  with r and d treated as constants by the gradient. ``r_max=1, d_max=0`` is plain BN.
- :class:`NoisyBatchNorm` (Santurkar et al. 2018, section 2.1): BN, then noise on each activation
  of each sample from a distribution of non-zero mean and non-unit variance that changes at
  every training step, so that the distribution each layer sees moves all the time ("internal
  covariate shift" injected on purpose); within a step it stays the same.
- GroupNorm and LayerNorm (Wu & He 2018) are torch.nn's :class:`~torch.nn.GroupNorm` (LayerNorm
  of a block is GroupNorm with one group: over channels and positions, one gamma/beta per channel).

Ghost BN and batch renorm keep torch.nn's running buffers and momentum semantics (see
:mod:`bncore.nn.batchnorm`); they are written in torch ops, so autograd differentiates them and
the recorder measures them as it measures any layer that is not bncore's BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bncore.nn.batchnorm import BatchNormBase
from bncore.nn.functional import eval_batch_norm

__all__ = ["BatchRenorm", "GhostBatchNorm", "NoisyBatchNorm", "new_noise", "noisy_norms"]


def _check(layer: BatchNormBase, x: Tensor) -> None:
    if x.dim() < 2 or x.shape[1] != layer.num_features:
        raise ValueError(
            f"{type(layer).__name__}({layer.num_features}) expects (N, {layer.num_features}, ...)"
            f" input, got shape {tuple(x.shape)}"
        )


def _affine(layer: BatchNormBase, y: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if layer.weight is not None:
        y = y * layer.weight.reshape(shape)
    if layer.bias is not None:
        y = y + layer.bias.reshape(shape)
    return y


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _batch_var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel biased variance and mean of an (N, C, ...) tensor, shaped (C,)."""
    return torch.var_mean(x, [0, *range(2, x.dim())], correction=0)


class _BatchStatsNorm(BatchNormBase):
    """A normalization by batch statistics with torch.nn's running buffers."""

    def __init__(self, *args: Any, unbiased_running_var: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unbiased_running_var = unbiased_running_var

    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Moves the running buffers towards a batch's mean and biased variance of ``count``
        values per channel."""
        if not (self.track_running_stats and self.running_mean is not None):
            return
        assert self.running_var is not None
        factor = self._running_factor()
        with torch.no_grad():
            if self.unbiased_running_var and count > 1:
                var = var * (count / (count - 1))
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_(var.detach(), factor)

    def forward(self, x: Tensor) -> Tensor:
        _check(self, x)
        rm, rv = self.running_mean, self.running_var
        if self.training or rm is None or rv is None:
            return _affine(self, self._normalize(x))
        return eval_batch_norm(x, rm, rv, self.weight, self.bias, self.eps)

    def _normalize(self, x: Tensor) -> Tensor:
        """Training: x normalized by the layer's own rule (before gamma and beta), moving the
        running buffers."""
        raise NotImplementedError


class GhostBatchNorm(_BatchStatsNorm):
    """Batch normalization over virtual batches of ``virtual_batch`` examples (the last one may
    be smaller). The running buffers move once per step, towards the virtual batches' average
    mean and variance (as Keras' ``virtual_batch_size`` does)."""

    def __init__(self, num_features: int, virtual_batch: int, *args: Any, **kwargs: Any) -> None:
        if virtual_batch < 2:
            raise ValueError(f"virtual_batch must be at least 2, got {virtual_batch}")
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch = virtual_batch

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch={self.virtual_batch}"

    def _normalize(self, x: Tensor) -> Tensor:
        outs, means, variances, count = [], [], [], 0
        for part in x.split(self.virtual_batch):
            var, mean = _batch_var_mean(part)
            scale = _per_channel(torch.rsqrt(var + self.eps), part)
            outs.append((part - _per_channel(mean, part)) * scale)
            means.append(mean)
            variances.append(var)
            count = count or part.numel() // part.shape[1]  # a full virtual batch's
        self._update_running(torch.stack(means).mean(0), torch.stack(variances).mean(0), count)
        return torch.cat(outs)


class BatchRenorm(_BatchStatsNorm):
    """Batch renormalization; see the module docstring. ``r_max``/``d_max`` are held fixed (the
    paper ramps them up from 1 and 0 during the first part of training)."""

    def __init__(
        self, num_features: int, r_max: float, d_max: float, *args: Any, **kwargs: Any
    ) -> None:
        if r_max < 1 or d_max < 0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got {r_max} and {d_max}")
        super().__init__(num_features, *args, **kwargs)
        self.r_max, self.d_max = r_max, d_max

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"

    def _normalize(self, x: Tensor) -> Tensor:
        var, mean = _batch_var_mean(x)
        std = torch.sqrt(var + self.eps)
        y = (x - _per_channel(mean, x)) / _per_channel(std, x)
        if self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                running_std = torch.sqrt(self.running_var + self.eps)
                r = (std / running_std).clamp(1 / self.r_max, self.r_max)
                d = ((mean - self.running_mean) / running_std).clamp(-self.d_max, self.d_max)
            y = y * _per_channel(r, x) + _per_channel(d, x)
        self._update_running(mean, var, x.numel() // x.shape[1])
        return y


class NoisyBatchNorm(torch.nn.Module):
    r"""``bn`` (a batch-norm layer), then in training noise on every activation of every sample:

    .. math::
        y'_{n,c} = \sigma_c \, y_{n,c} + \mu_c + e_{n,c}, \qquad
        \mu_c \sim U(-s, s),\; \sigma_c \sim U(1, k),\; e_{n,c} \sim N(0, s^2)

    with ``s = noise_shift`` and ``k = noise_scale``: the noise has a non-zero mean and a
    non-unit variance, and its distribution (:math:`\mu_c, \sigma_c`) is drawn anew at every
    training step (:meth:`new_step`, called by the trainer; :func:`new_noise` for a model), so the
    channel's distribution moves from step to step. Within a step the same noise serves every
    forward pass over the same batch: a second pass (internal covariate shift's G', the
    landscape) sees the network the first one did. Evaluation is ``bn`` alone. The running
    buffers and gamma/beta are ``bn``'s, visible under the usual names."""

    def __init__(self, bn: BatchNormBase, noise_shift: float, noise_scale: float) -> None:
        if noise_shift < 0 or noise_scale < 1:
            raise ValueError(
                f"need noise_shift >= 0 and noise_scale >= 1, got {noise_shift} and {noise_scale}"
            )
        super().__init__()
        self.bn = bn
        self.noise_shift, self.noise_scale = noise_shift, noise_scale
        self._noise: tuple[Tensor, Tensor, Tensor] | None = None  # (sigma, mu, e) of this step

    def extra_repr(self) -> str:
        return f"noise_shift={self.noise_shift}, noise_scale={self.noise_scale}"

    def __getattr__(self, name: str) -> Any:
        if name in ("weight", "bias", "running_mean", "running_var", "num_features", "eps"):
            return getattr(self._modules["bn"], name)
        return super().__getattr__(name)

    def new_step(self) -> None:
        """The next training forward draws this step's noise."""
        self._noise = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if not self.training:
            return y
        noise = self._noise
        if noise is None or noise[2].shape != y.shape or noise[2].device != y.device:
            noise = self._noise = self._draw(y)
        sigma, mu, e = noise
        return y * _per_channel(sigma, y) + _per_channel(mu, y) + e

    def _draw(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = y.shape[1]
        sigma = y.new_empty(c).uniform_(1.0, self.noise_scale)
        mu = y.new_empty(c).uniform_(-self.noise_shift, self.noise_shift)
        e = torch.randn_like(y) * self.noise_shift
        return sigma, mu, e


def noisy_norms(model: torch.nn.Module) -> list[NoisyBatchNorm]:
    """The :class:`NoisyBatchNorm` layers of ``model`` (a trainer finds them once)."""
    return [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]


def new_noise(model: torch.nn.Module) -> None:
    """A new training step: every :class:`NoisyBatchNorm` of ``model`` draws new noise."""
    for m in noisy_norms(model):
        m.new_step()

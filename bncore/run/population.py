r"""Population statistics of a model's batch normalizations, recomputed as PreciseBN does
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3), against the EMA running
statistics that training keeps.

The model is frozen: its weights do not move while K batches of B training examples go
through it in training mode, each normalization normalizing with its own batch statistics as
in training. Per channel, the per-batch means :math:`\mu_k` and variances :math:`\sigma^2_k`
are aggregated as

.. math::
    \mu_{pop} = \frac{1}{K}\sum_k \mu_k, \qquad
    \sigma^2_{pop} = \frac{1}{K}\sum_k \left(\sigma^2_k + \mu_k^2\right) - \mu_{pop}^2

(the variance of all K B values, not the mean of the batch variances, which misses the spread
of the batch means), with Bessel's correction over the K B values, as torch.nn's running
variance has it. The EMA statistics lag the model, which moves while they average; the gap
between the two, and the accuracy each gives, is what the paper measures.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bncore.run.landscape import preserved

__all__ = [
    "PopulationStats",
    "ema_gaps",
    "population_statistics",
    "running",
    "running_buffers",
    "set_running",
    "tracked_norms",
]

#: name -> (mean, variance) per channel of one normalization.
PopulationStats = dict[str, tuple[Tensor, Tensor]]


def tracked_norms(blocks: Iterable[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """The blocks' normalizations that keep running statistics, by block name."""
    out = {}
    for name, block in blocks:
        norm = getattr(block, "norm", None)
        if isinstance(norm, nn.Module) and running(norm) is not None:
            out[name] = norm
    return out


def running(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """A normalization's running mean and variance (the live buffers), or None."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    return (mean, var) if isinstance(mean, Tensor) and isinstance(var, Tensor) else None


def _running(norm: nn.Module) -> tuple[Tensor, Tensor]:
    found = running(norm)
    assert found is not None  # tracked_norms keeps only these
    return found


@torch.no_grad()
def population_statistics(
    model: nn.Module, norms: dict[str, nn.Module], batches: Iterable[Tensor]
) -> PopulationStats:
    """Each normalization's population (mean, unbiased variance) over ``batches``, the model
    frozen (weights, buffers and random state left as found)."""
    sums: dict[str, list[Tensor | int]] = {}

    def hook(name: str):
        def pre(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().double()
            dims = [0, *range(2, x.dim())]
            count = x.numel() // x.shape[1]
            s1, s2 = x.sum(dims), x.square().sum(dims)
            if name in sums:
                a, b, n = sums[name]
                sums[name] = [a + s1, b + s2, int(n) + count]
            else:
                sums[name] = [s1, s2, count]

        return pre

    handles = [norm.register_forward_pre_hook(hook(name)) for name, norm in norms.items()]
    was_training = model.training
    try:
        with preserved(model):
            model.train()
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: PopulationStats = {}
    for name, (s1, s2, n) in sums.items():
        assert isinstance(s1, Tensor) and isinstance(s2, Tensor)
        n = int(n)
        mean = s1 / n
        var = (s2 / n - mean.square()).clamp_min(0) * (n / max(n - 1, 1))
        rm, rv = _running(norms[name])
        out[name] = (mean.to(rm.dtype), var.to(rv.dtype))
    return out


@contextmanager
def running_buffers(norms: dict[str, nn.Module], stats: PopulationStats):
    """The normalizations use ``stats`` as their running statistics inside the block, their
    own again after it."""
    saved = {n: tuple(t.clone() for t in _running(m)) for n, m in norms.items()}
    try:
        set_running(norms, stats)
        yield
    finally:
        set_running(norms, {n: (mean, var) for n, (mean, var) in saved.items()})


@torch.no_grad()
def set_running(norms: dict[str, nn.Module], stats: PopulationStats) -> None:
    """Writes ``stats`` into the normalizations' running buffers."""
    for name, (mean, var) in stats.items():
        rm, rv = _running(norms[name])
        rm.copy_(mean)
        rv.copy_(var)


def ema_gaps(norms: dict[str, nn.Module], stats: PopulationStats) -> dict[str, tuple[float, float]]:
    r"""Per normalization, how far the EMA running statistics are from the population's, as
    RMS over channels: of :math:`(\mu_{EMA} - \mu_{pop}) / \sqrt{\sigma^2_{pop} + \epsilon}`
    (the mean's error in the population's standard deviations) and of
    :math:`(\sigma^2_{EMA} - \sigma^2_{pop}) / (\sigma^2_{pop} + \epsilon)` (the variance's relative
    error)."""
    out = {}
    for name, (mean, var) in stats.items():
        eps = float(getattr(norms[name], "eps", 1e-5))
        rm, rv = _running(norms[name])
        scale = (var.double() + eps).sqrt()
        dm = (rm.double() - mean.double()) / scale
        dv = (rv.double() - var.double()) / scale.square()
        out[name] = (float(dm.square().mean().sqrt()), float(dv.square().mean().sqrt()))
    return out

r"""Signal propagation through a residual network (Brock, De & Smith 2021, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets", section 3).

For the output :math:`x_\ell` of each residual block on one batch, in training mode:

- the average channel squared mean,
  :math:`\frac{1}{C}\sum_c \left(\mathrm{mean}_{N,H,W}\, x_{\ell,c}\right)^2`;
- the average channel variance, :math:`\frac{1}{C}\sum_c \mathrm{var}_{N,H,W}\, x_{\ell,c}`;
- the residual branch's average channel variance: the same of what the branch added
  (:math:`\alpha f_\ell(x_{\ell-1})`).

In a BN ResNet the variance grows linearly with depth and each branch's share shrinks (the
blocks tend to the identity); without normalization it explodes, unless the branches are scaled
down (SkipInit's alpha = 0 at initialization keeps it flat).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bncore.run.landscape import preserved
from bncore.run.models import Net

__all__ = ["signal_moments", "signal_propagation"]


def signal_moments(x: Tensor) -> tuple[float, float]:
    """(average channel squared mean, average channel variance) of an (N, C, ...) tensor."""
    var, mean = torch.var_mean(x.double(), [0, *range(2, x.dim())], correction=0)
    return float(mean.square().mean()), float(var.mean())


@torch.no_grad()
def signal_propagation(model: Net, x: Tensor) -> dict[str, tuple[float, float, float]]:
    """Residual block name -> (squared mean, variance, branch variance) of its output on batch
    ``x``, in training mode; the model (weights, buffers, random state) is left as found. Empty
    for a network without residual blocks."""
    blocks = model.residual_blocks()
    if not blocks:
        return {}
    was_training = model.training
    for _, r in blocks:
        r.keep = True
    try:
        with preserved(model):
            model.train()
            model(x)
        out = {}
        for name, r in blocks:
            assert r.out is not None and r.branch_out is not None
            out[name] = (*signal_moments(r.out), signal_moments(r.branch_out)[1])
        return out
    finally:
        for _, r in blocks:
            r.keep, r.out, r.branch_out = False, None, None
        model.train(was_training)

r"""What Santurkar, Tsipras, Ilyas & Madry (2018, "How Does Batch Normalization Help
Optimization?") measure, on the live model, leaving it (weights, buffers, gradients) as found.

Internal covariate shift of block i at step t (their Definition 2.1):

.. math::
    \mathrm{ICS}_i = \lVert G_i - G'_i \rVert_2, \quad
    G_i = \nabla_{W_i} L(W^{t}_{1..k}; x_t, y_t), \quad
    G'_i = \nabla_{W_i} L(W^{t+1}_{1..i-1}, W^{t}_{i..k}; x_t, y_t)

the change of block i's weight gradient, on the same batch, once the blocks below took their
step. Block 0 has no block below: its ICS is 0 and its cosine 1 by definition.

The landscape along the gradient (their section 3.1): from the weights w and the gradient g of
a batch, the loss and gradient at w - eta g for several step sizes eta: the spread of the loss
("loss landscape"), the largest gradient change ("gradient predictiveness") and the largest
ratio ||g(w - eta g) - g(w)|| / ||eta g|| ("effective beta-smoothness").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from bncore.run.models import Block

__all__ = ["internal_covariate_shift", "landscape", "preserved"]

Loss = Callable[[Tensor, Tensor], Tensor]


@contextmanager
def preserved(model: nn.Module):
    """Restores the model's parameter values and buffers (running statistics, batch counts),
    and the random number generators (noisy BN draws from them), on exit."""
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        with torch.no_grad():
            for p, saved in zip(model.parameters(), params, strict=True):
                p.copy_(saved)
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)


def _grads(model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor, wrt: Sequence[Tensor]):
    loss = loss_fn(model(x), y)
    return loss.detach(), torch.autograd.grad(loss, list(wrt))


def internal_covariate_shift(
    model: nn.Module,
    loss_fn: Loss,
    x: Tensor,
    y: Tensor,
    blocks: Sequence[Block],
    before: Sequence[Tensor],
    step: Callable[[], None],
) -> tuple[Tensor, Tensor]:
    """Takes the optimizer ``step`` and returns (ICS, cosine) per block, shape (k,).

    Call after the backward of batch (x, y); ``before`` are the blocks' weight gradients G_i
    (copies; a block's weight is ``block.layer.weight``). The model is left at W^{t+1}, its
    buffers as they were after the step's forward.
    """
    params = list(model.parameters())
    level = {id(p): len(blocks) for p in params}  # the head: above every block
    for j, block in enumerate(blocks):
        for p in block.parameters():
            level[id(p)] = j
    old = [p.detach().clone() for p in params]
    step()
    new = [p.detach().clone() for p in params]
    dist = torch.zeros(len(blocks), device=x.device)
    cos = torch.ones(len(blocks), device=x.device)
    with preserved(model):
        for i in range(1, len(blocks)):
            with torch.no_grad():  # the blocks below i at t+1, block i and above at t
                for p, a, b in zip(params, old, new, strict=True):
                    p.copy_(b if level[id(p)] < i else a)
            _, (g,) = _grads(model, loss_fn, x, y, [blocks[i].layer.weight])
            dist[i] = (before[i] - g).norm()
            cos[i] = nn.functional.cosine_similarity(before[i].flatten(), g.flatten(), dim=0)
    return dist, cos


def landscape(
    model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor, etas: Sequence[float]
) -> dict[str, float]:
    """Loss and gradient along the gradient direction at step sizes ``etas`` from the current
    weights, on batch (x, y); the model is left as it was."""
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved(model):
        loss0, g0 = _grads(model, loss_fn, x, y, params)
        losses, changes, ratios = [float(loss0)], [], []
        g_norm = torch.sqrt(sum((g * g).sum() for g in g0))
        for eta in etas:
            with torch.no_grad():
                for p, g in zip(params, g0, strict=True):
                    p.sub_(g, alpha=eta)
            loss, g1 = _grads(model, loss_fn, x, y, params)
            with torch.no_grad():
                for p, g in zip(params, g0, strict=True):
                    p.add_(g, alpha=eta)
            change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g1, g0, strict=True)))
            losses.append(float(loss))
            changes.append(float(change))
            ratios.append(float(change / (eta * g_norm).clamp_min(1e-30)))
    finite = [v for v in losses if v == v and abs(v) != float("inf")]
    lo, hi = min(finite, default=float("nan")), max(finite, default=float("nan"))
    return {
        "landscape_loss_min": lo,
        "landscape_loss_max": hi,
        "landscape_loss_range": hi - lo,
        "grad_change": max(changes),
        "beta_smoothness": max(ratios),
    }

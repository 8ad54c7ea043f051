"""What the BN literature predicts, in closed form, and the measured quantity to set beside it.

Kept apart from the engine: the engine records per-layer statistics; these functions turn the
records into the number a paper reports, and give the paper's value for it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gradient_explosion_rate", "gradient_growth_rate"]


def gradient_explosion_rate(activation: str, batch_size: int) -> float:
    r"""Yang et al. 2019 ("A Mean Field Theory of Batch Normalization"): at initialization, the
    squared norm of the gradient in a deep, wide, fully connected BN network grows by this
    factor per layer, going from the output towards the input.

    - ``linear``: :math:`(B-2)/(B-3)` for batch size B > 3;
    - ``relu``: :math:`\pi/(\pi-1) \approx 1.467`, the large-batch limit (the paper's finite-B
      rate approaches it from above).
    """
    if activation == "linear":
        if batch_size <= 3:
            raise ValueError(f"the linear rate (B-2)/(B-3) needs batch_size > 3, got {batch_size}")
        return (batch_size - 2) / (batch_size - 3)
    if activation == "relu":
        return math.pi / (math.pi - 1)
    raise ValueError(f"no closed-form rate here for activation {activation!r} (linear, relu)")


def gradient_growth_rate(
    layers: dict[str, np.ndarray], depth: int, column: str = "grad_in_norm", skip: int = 2
) -> float:
    """The measured counterpart of :func:`gradient_explosion_rate`: the per-layer factor by
    which the squared gradient norm grows towards the input, from a least-squares line through
    log ||g_l||^2 over the blocks (averaged over the recorded steps given), leaving out ``skip``
    blocks at each end where the input and the classifier head distort it.

    ``layers`` are records in block order per step (bncore.records: ``layers`` table).
    """
    g = np.asarray(layers[column], dtype=np.float64)
    if g.size == 0 or g.size % depth:
        raise ValueError(f"{g.size} values of {column!r} are not whole steps of {depth} blocks")
    if depth - 2 * skip < 2:
        raise ValueError(f"depth {depth} leaves fewer than 2 blocks after skipping {skip} per end")
    log_sq = np.log(g.reshape(-1, depth) ** 2).mean(0)[skip : depth - skip]
    slope = np.polyfit(np.arange(len(log_sq)), log_sq, 1)[0]
    return float(math.exp(-slope))

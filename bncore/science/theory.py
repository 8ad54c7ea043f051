"""What the BN literature predicts (in closed form, or by the paper's own mean field computation),
and the measured quantity to set beside it.

Kept apart from the engine: the engine records per-layer statistics; these functions turn the
records into the number a paper reports, and give the paper's value for it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

__all__ = [
    "gradient_explosion_rate",
    "gradient_growth_rate",
    "gradient_growth_uncertainty",
    "mean_field_rate",
]


def gradient_explosion_rate(activation: str, batch_size: int) -> float:
    r"""Yang et al. 2019 ("A Mean Field Theory of Batch Normalization"): at initialization, the
    squared norm of the gradient in a deep, wide, fully connected BN network grows by this
    factor per layer, going from the output towards the input.

    - ``linear``: :math:`(B-2)/(B-3)` for batch size B > 3, in closed form;
    - ``relu``: the finite-B rate of the same mean field theory (:func:`mean_field_rate`:
      1.79 at B=8, 1.52 at 32, 1.48 at 128; the paper's 1.788, 1.522, 1.480), which tends to
      :math:`\pi/(\pi-1) \approx 1.467` as B grows.
    """
    if activation == "linear":
        if batch_size <= 3:
            raise ValueError(f"the linear rate (B-2)/(B-3) needs batch_size > 3, got {batch_size}")
        return (batch_size - 2) / (batch_size - 3)
    if activation == "relu":
        if batch_size <= 3:
            raise ValueError(f"the rate needs batch_size > 3, got {batch_size}")
        return mean_field_rate("relu", batch_size)
    raise ValueError(f"no rate here for activation {activation!r} (linear, relu)")


@functools.lru_cache(maxsize=64)
def mean_field_rate(activation: str, batch_size: int, samples: int = 400_000) -> float:
    r"""The per-layer growth of the squared gradient of a deep, infinitely wide BN network at
    initialization, at batch size B, from Yang et al.'s mean field theory, by Monte Carlo (a
    fixed seed: the same value every call; about 0.3% of sampling error at the default).

    The batch's Gram matrix sits at its permutation-symmetric fixed point
    :math:`\Sigma^* = a I + b \mathbf{1}\mathbf{1}^T`; BN removes the :math:`b` part, so a
    layer's normalized pre-activations are :math:`z = \mathrm{BN}(\epsilon)` with
    :math:`\epsilon \sim N(0, I_B)` and scale :math:`\sqrt{a}`, where
    :math:`a = E[\phi(z_i)^2] - E[\phi(z_i)\phi(z_j)]`. The gradient's batch covariance
    evolves by :math:`\Pi \mapsto E[J^T \Pi J]`, with
    :math:`J = D\,(P - z z^T/B) / s` (:math:`D = \mathrm{diag}\,\phi'(z)`, :math:`P` the
    centering projector, :math:`s` the batch's standard deviation); its leading eigenvector is
    :math:`P` by symmetry, so the rate is :math:`E\|P J\|_F^2 / (B - 1)`, which for the
    projector :math:`P - zz^T/B` is a sum of O(B) terms per sample. For ``linear`` it gives
    (B-2)/(B-3) (a test checks it), for ``relu`` the paper's finite-B values.
    """
    phi: dict[str, tuple[Any, Any]] = {
        "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
        "linear": (lambda z: z, np.ones_like),
    }
    if activation not in phi:
        raise ValueError(f"no mean field rate here for {activation!r} ({', '.join(phi)})")
    f, df = phi[activation]
    b = batch_size
    rng = np.random.default_rng(0)
    diag = off = grad = 0.0
    chunk = max(1, 2**22 // b)
    done = 0
    while done < samples:
        n = min(chunk, samples - done)
        c = rng.standard_normal((n, b))
        c -= c.mean(1, keepdims=True)
        var = (c * c).mean(1)
        z = c / np.sqrt(var)[:, None]
        x, d = f(z), df(z)
        sq = (x * x).sum(1)
        diag += sq.sum() / b
        off += ((x.sum(1) ** 2 - sq) / (b * (b - 1))).sum()
        d2 = d * d
        # ||P D (P - z z^T/B)||_F^2 = tr(D P D) - 1^T D P D 1 / B - z^T D P D z / B
        norm = (d2.sum(1) * (1 - 1 / b) - (d2.sum(1) - d.sum(1) ** 2 / b) / b
                - ((d2 * z * z).sum(1) - (d * z).sum(1) ** 2 / b) / b)  # fmt: skip
        grad += (norm / var).sum()
        done += n
    a = (diag - off) / samples
    return float(grad / samples / (a * (b - 1)))


def gradient_growth_rate(
    layers: dict[str, np.ndarray], depth: int, column: str = "grad_in_norm", skip: int = 2
) -> float:
    """The measured counterpart of :func:`gradient_explosion_rate`: the per-layer factor by
    which the squared gradient norm grows towards the input, from a least-squares line through
    log ||g_l||^2 over the blocks (averaged over the recorded steps given), leaving out ``skip``
    blocks at each end where the input and the classifier head distort it.

    ``layers`` are records in block order per step (bncore.record.tables: ``layers`` table).
    """
    g = np.asarray(layers[column], dtype=np.float64)
    if g.size == 0 or g.size % depth:
        raise ValueError(f"{g.size} values of {column!r} are not whole steps of {depth} blocks")
    if depth - 2 * skip < 2:
        raise ValueError(f"depth {depth} leaves fewer than 2 blocks after skipping {skip} per end")
    log_sq = np.log(g.reshape(-1, depth) ** 2).mean(0)[skip : depth - skip]
    slope = np.polyfit(np.arange(len(log_sq)), log_sq, 1)[0]
    return float(math.exp(-slope))


def gradient_growth_uncertainty(norms: np.ndarray, skip: int = 2) -> float:
    """The uncertainty of :func:`gradient_growth_rate` measured from ``norms`` (steps x blocks,
    input side first): the standard error of the rate over the steps' batches, and half the
    difference between the rates fitted to the first and the second half of the blocks (the
    drift with depth: a finite network has not settled at the mean field's fixed point),
    added in quadrature.
    """
    g = np.asarray(norms, dtype=np.float64)
    log_sq = np.log(g**2)[:, skip : g.shape[1] - skip]
    if log_sq.shape[1] < 4:
        raise ValueError(f"{g.shape[1]} blocks leave fewer than 4 after skipping {skip} per end")

    def rate(cols: np.ndarray) -> float:
        return float(math.exp(-np.polyfit(np.arange(cols.shape[-1]), cols, 1)[0]))

    per_step = [rate(row) for row in log_sq]
    batches = (
        float(np.std(per_step, ddof=1) / math.sqrt(len(per_step))) if len(per_step) > 1 else 0.0
    )
    half = log_sq.shape[1] // 2
    mean = log_sq.mean(0)
    depth = abs(rate(mean[: half + 1]) - rate(mean[half:])) / 2
    return float(math.hypot(batches, depth))

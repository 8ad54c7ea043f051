r"""The BN calculator: one training-mode step of batch normalization on numbers a person types,
every intermediate value shown, computed by bncore's own BatchNorm1d (float64).

For a batch :math:`x_1..x_N` of one channel:

.. math::
    \mu = \frac{1}{N}\sum_i x_i, \quad \sigma^2 = \frac{1}{N}\sum_i (x_i - \mu)^2, \quad
    \hat{x}_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad y_i = \gamma \hat{x}_i + \beta

and the running statistics move by ``momentum`` (PyTorch's weight of the new value):
:math:`r_\mu \leftarrow (1 - m) r_\mu + m \mu`, :math:`r_{\sigma^2} \leftarrow (1 - m) r_{\sigma^2}
+ m \frac{N}{N-1} \sigma^2` (the unbiased variance; Keras uses the biased one).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from bncore.nn.batchnorm import BatchNorm1d

__all__ = ["SEED_EXAMPLE", "explain", "parse_values"]

#: Seed 001's worked example: it states mean 6 and variance 9, which are not this batch's.
SEED_EXAMPLE = "1, 4, 6, 8, 10, 9"
MAX_VALUES = 1000


def parse_values(text: str) -> np.ndarray:
    """A batch from text: one example per line, channels separated by commas or spaces (a single
    line of numbers is one channel, one example per number). Returns (N, C) float64."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise ValueError("type some numbers: one channel as 1, 4, 6, or one example per line")
    rows = []
    for k, ln in enumerate(lines, 1):
        try:
            rows.append([float(v) for v in re.split(r"[,;\s]+", ln.strip()) if v])
        except ValueError:
            raise ValueError(f"line {k} is not a list of numbers: {ln.strip()!r}") from None
    if len(rows) == 1:
        x = np.asarray(rows[0])[:, None]
    else:
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise ValueError(f"every line needs the same number of channels, got {sorted(widths)}")
        x = np.asarray(rows)
    if x.shape[0] < 2:
        raise ValueError("a batch needs at least 2 examples (with 1 the variance is 0)")
    if x.size > MAX_VALUES:
        raise ValueError(f"at most {MAX_VALUES} numbers, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError("the numbers must be finite")
    return x


def explain(
    x: np.ndarray,
    gamma: float = 1.0,
    beta: float = 0.0,
    eps: float = 1e-5,
    momentum: float = 0.1,
    running_mean: float = 0.0,
    running_var: float = 1.0,
) -> dict[str, Any]:
    """Each step of one training-mode forward of BatchNorm1d on ``x`` (N, C): per channel the
    mean, the biased and unbiased variance, x_hat, y and the running statistics before and after.
    ``y`` and the running statistics come from bncore's layer; the rest follows the formulas."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    n, c = x.shape
    layer = BatchNorm1d(c, eps=eps, momentum=momentum, dtype=torch.float64)
    weight, bias = layer.weight, layer.bias
    mean_buf, var_buf = layer.running_mean, layer.running_var
    # affine, tracking running statistics: none of them is None
    assert weight is not None and bias is not None
    assert mean_buf is not None and var_buf is not None
    with torch.no_grad():
        weight.fill_(gamma)
        bias.fill_(beta)
        mean_buf.fill_(running_mean)
        var_buf.fill_(running_var)
        y = layer(torch.as_tensor(x, dtype=torch.float64)).numpy()
    mean = x.mean(0)
    var = x.var(0)
    unbiased = x.var(0, ddof=1)
    x_hat = (x - mean) / np.sqrt(var + eps)
    return {
        "n": n,
        "channels": c,
        "x": x.T.tolist(),
        "mean": mean.tolist(),
        "var": var.tolist(),
        "var_unbiased": unbiased.tolist(),
        "x_hat": x_hat.T.tolist(),
        "x_hat_mean": x_hat.mean(0).tolist(),
        "x_hat_var": x_hat.var(0).tolist(),
        "y": y.T.tolist(),
        "gamma": gamma,
        "beta": beta,
        "eps": eps,
        "momentum": momentum,
        "running_mean_before": running_mean,
        "running_var_before": running_var,
        "running_mean": mean_buf.tolist(),
        "running_var": var_buf.tolist(),
    }

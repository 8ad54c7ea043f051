"""The statistics a batch-norm layer computes anyway, kept for whoever wants to look.

Every tensor is per channel, detached, on the layer's device: recording costs no extra pass over
the data and no host synchronisation. Reading them (``.cpu()``, ``.item()``) is the reader's cost.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

from bncore.kernels.reference import Backward


@dataclass
class BNStats:
    """Per-channel by-products of the last training-mode forward and the last backward.

    Forward: ``mean`` and ``var`` are the batch statistics the layer normalized with (``var`` is
    the biased variance). Backward: ``sum_dy`` (= dL/dbeta), ``sum_dy_xhat`` (= dL/dgamma),
    ``dy_sq`` = sum dy^2 and ``dx_sq`` = sum dx^2, the squared norms of the activation gradient
    leaving and entering the layer. ``forward_steps`` and ``backward_steps`` count the calls, so a
    reader can tell whether the backward values belong to the latest forward.
    """

    mean: Tensor | None = None
    var: Tensor | None = None
    sum_dy: Tensor | None = None
    sum_dy_xhat: Tensor | None = None
    dy_sq: Tensor | None = None
    dx_sq: Tensor | None = None
    forward_steps: int = 0
    backward_steps: int = 0

    def record_forward(self, mean: Tensor, var: Tensor) -> None:
        self.mean, self.var = mean.detach(), var.detach()
        self.forward_steps += 1

    def record_backward(self, grads: Backward) -> None:
        self.sum_dy = grads.sum_dy.detach()
        self.sum_dy_xhat = grads.sum_dy_xhat.detach()
        self.dy_sq = grads.dy_sq.detach()
        self.dx_sq = None if grads.dx_sq is None else grads.dx_sq.detach()
        self.backward_steps += 1

    def clear(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

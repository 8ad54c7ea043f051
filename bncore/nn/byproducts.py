"""The statistics a batch-norm layer computes anyway, kept for whoever wants to look.

Every tensor is per channel, detached, on the layer's device: recording costs no extra pass over
the data and no host synchronisation. Reading them (``.cpu()``, ``.item()``) is the reader's cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

#: The rows (C values each) of a BN layer's part of a recorded step, then its tracked units.
RECORD_ROWS = ("pre_mean", "pre_var", "act_mean", "act_var", "act_lo", "act_hi",
               "running_mean", "running_var", "gamma", "beta",
               "gamma_grad", "beta_grad", "grad_out_sq", "grad_in_sq")  # fmt: skip
RECORD_ACT = RECORD_ROWS.index("act_mean")  # the first of 4 activation rows
RECORD_RUNNING = RECORD_ROWS.index("running_mean")  # running mean and var, gamma, beta
RECORD_GRAD = RECORD_ROWS.index("gamma_grad")  # the first of 4 gradient rows


class RecordTarget(NamedTuple):
    """Where a BN layer writes a recorded step itself, while the values are in cache.

    ``row``: 1-d, ``len(RECORD_ROWS) * C`` values, then ``N * len(units)`` for the output at
    the tracked ``units`` (n-major; at the centre of any trailing dims) when ``units`` is given.
    ``act`` and ``grad`` are (4, C) views on its activation and gradient rows; the forward fills
    ``act`` only when asked for activation statistics, the backward fills ``grad``.
    """

    row: Tensor
    act: Tensor
    grad: Tensor
    units: Tensor | None


@dataclass
class BNStats:
    """Per-channel by-products of the last training-mode forward and of its backward.

    Forward: ``mean`` and ``var``, the batch statistics the layer normalized with (``var`` is the
    biased variance). Backward: ``grad``, a (4, C) tensor that the forward allocates (NaN) and its
    backward fills in place, with rows ``sum_dy_xhat`` (= dL/dgamma), ``sum_dy`` (= dL/dbeta),
    ``dy_sq`` = sum dy^2 and ``dx_sq`` = sum dx^2: the squared norms of the activation gradient
    reaching and leaving the layer (NaN where dx was not needed). ``act``: on the forwards that
    asked for it (``layer.record_activation``), the (4, C) mean, variance and tail fractions of
    the activation that follows the layer, taken while its output was in registers.
    ``steps`` counts forwards.
    """

    mean: Tensor | None = None
    var: Tensor | None = None
    grad: Tensor | None = None
    act: Tensor | None = None
    steps: int = 0

    GRAD_ROWS = ("sum_dy_xhat", "sum_dy", "dy_sq", "dx_sq")

    def record(self, mean: Tensor, var: Tensor, grad: Tensor, act: Tensor | None = None) -> None:
        self.mean, self.var, self.grad, self.act = mean, var, grad, act
        self.steps += 1

    def _row(self, i: int) -> Tensor | None:
        return None if self.grad is None else self.grad[i]

    @property
    def sum_dy_xhat(self) -> Tensor | None:
        return self._row(0)

    @property
    def sum_dy(self) -> Tensor | None:
        return self._row(1)

    @property
    def dy_sq(self) -> Tensor | None:
        return self._row(2)

    @property
    def dx_sq(self) -> Tensor | None:
        return self._row(3)

    def clear(self) -> None:
        self.mean = self.var = self.grad = self.act = None
        self.steps = 0

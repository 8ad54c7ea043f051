"""The statistics a batch-norm layer computes anyway, and how a recorder asks for them.

Every tensor is per channel, detached, on the layer's device: recording costs no extra pass over
the data and no host synchronisation. Reading them (``.cpu()``, ``.item()``) is the reader's cost.

A recorder (bncore.record: the recorder of bncore's networks, the watcher of any model) hands a
layer a :class:`Recording` once (``layer.record_to(recording)``); at each training forward the
layer asks it what to measure and where to write (:class:`Capture`), and the kernels write it
while the values are in cache. Nobody sets the layer's attributes from outside.
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


class ActivationStats(NamedTuple):
    """Ask a training forward for the statistics of the activation that follows it:
    ``kind`` (IDENTITY or RELU) and the rest/saturation thresholds ``lo``, ``hi`` (values at or
    below ``lo``, at or above ``hi``)."""

    kind: int
    lo: float
    hi: float


#: Activation kinds a forward can take statistics of (bn_cpu.cpp uses the same numbers).
IDENTITY, RELU = 1, 2


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


class Recording:
    """Who records a bncore BN layer, handed to it by ``layer.record_to``. At each training
    forward the layer asks :meth:`target` where to write its part of the recorded step (None:
    nowhere) and measures :attr:`activation`, the activation that follows it, if set.

    This base records nothing but the activation it is given; the recorders subclass it."""

    def __init__(self, activation: ActivationStats | None = None) -> None:
        self.activation = activation

    def target(self, input: Tensor) -> RecordTarget | None:
        """Where this forward of ``input`` writes its row (see :class:`RecordTarget`)."""
        return None


@dataclass
class BNStats:
    """Per-channel by-products of the last training-mode forward and of its backward.

    Forward: ``mean`` and ``var``, the batch statistics the layer normalized with (``var`` is the
    biased variance). Backward: ``grad``, a (4, C) tensor that the forward allocates (NaN) and its
    backward fills in place, with rows ``sum_dy_xhat`` (= dL/dgamma), ``sum_dy`` (= dL/dbeta),
    ``dy_sq`` = sum dy^2 and ``dx_sq`` = sum dx^2: the squared norms of the activation gradient
    reaching and leaving the layer (NaN where dx was not needed). ``act``: on the forwards that
    asked for it (its :class:`Recording`'s ``activation``), the (4, C) mean, variance and tail
    fractions of the activation that follows the layer, taken while its output was in registers.
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

    def __getattr__(self, name: str) -> Tensor | None:
        """A row of ``grad`` by its name in GRAD_ROWS (``stats.sum_dy``); None before a
        forward."""
        rows = type(self).GRAD_ROWS
        if name not in rows:
            raise AttributeError(f"BNStats has no attribute {name!r}")
        return None if self.grad is None else self.grad[rows.index(name)]

    def clear(self) -> None:
        self.mean = self.var = self.grad = self.act = None
        self.steps = 0


class Capture(NamedTuple):
    """What a training-mode forward keeps besides its output, for the kernels: the layer's
    ``stats``, the ``act``ivation to measure, the ``record`` row to write."""

    stats: BNStats | None = None
    act: ActivationStats | None = None
    record: RecordTarget | None = None

    @staticmethod
    def of(stats: BNStats, recording: Recording | None, input: Tensor) -> Capture:
        """What a layer with ``stats``, recorded by ``recording``, keeps of a forward."""
        if recording is None:
            return Capture(stats)
        return Capture(stats, recording.activation, recording.target(input))

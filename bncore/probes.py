"""The recorder: every block's statistics on every recorded step, kept on the device.

On a recorded step the trainer arms the recorder; each block hands it the tensors at its
positions during the forward (see bncore.models.Block). What BN already computed is taken as is:
its batch statistics, its parameters and buffers, and the (4, C) gradient sums its backward fills.
Its output statistics follow exactly from those (mean = beta, var = gamma^2 var/(var + eps)), so
they cost nothing either. Where a ReLU or no nonlinearity follows BN, BN also measures the
activation in its normalize pass, with its output still in registers; each weight's gradient
norm is taken by a C++ hook the moment the backward produces it. What is left (other
activations; everything, off the CPU) is measured after the backward, in the single call that
writes the step's row. Without BN, the norm positions are measured the same way and the gradient
there is summed by a hook.

After the backward, :meth:`Recorder.snapshot` writes the step's row of a device buffer with one
call (:func:`bncore.kernels.record_row_fn`: fused on the CPU). :meth:`Recorder.flush` moves all
pending rows to the host in a single transfer and turns them into ``layers`` and ``channels``
rows (bncore.records).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bncore import kernels
from bncore.kernels import cpu
from bncore.kernels.reference import (
    COPY,
    IDENTITY,
    MEAN_VAR,
    MOMENTS,
    NORM,
    RELU,
    UNITS,
    ActivationStats,
)
from bncore.models import Block, Net
from bncore.records import Records, channel_rows, summarize
from bncore.stats import BNStats

__all__ = ["QUANTILES", "SATURATION", "Recorder"]

#: Activation outputs at rest or saturated: (at or below lo, at or above hi).
SATURATION: dict[str, tuple[float, float]] = {
    "relu": (0.0, math.inf),
    "sigmoid": (0.01, 0.99),
    "tanh": (-0.99, 0.99),
    "linear": (-math.inf, math.inf),
}
QUANTILES = (15, 50, 85)

#: Rows (C values each) of a block's raw record, before the tracked units' values.
BN_ROWS = ("pre_mean", "pre_var", "act_mean", "act_var", "act_lo", "act_hi",
           "running_mean", "running_var", "gamma", "beta",
           "gamma_grad", "beta_grad", "grad_out_sq", "grad_in_sq")  # fmt: skip
MEASURED_ROWS = (*BN_ROWS[:2], "post_mean", "post_var", *BN_ROWS[2:])


class _BlockSlot:
    """What the recorder knows about one block: its record layout and live tensors."""

    def __init__(self, name: str, block: Block, units: int, device: torch.device):
        self.name, self.block, self.norm = name, block, block.norm
        self.channels = c = block.channels
        self.units = torch.linspace(0, c - 1, min(units, c), device=device).round().long()
        self.is_bn = isinstance(getattr(block.norm, "stats", None), BNStats)
        self.act_spec: ActivationStats | None = None  # what BN measures of the activation
        self.rows = BN_ROWS if self.is_bn else MEASURED_ROWS
        self.nan = torch.full((c,), math.nan, device=device)
        self.nan4 = torch.full((4 * c,), math.nan, device=device)
        norm = block.norm
        self.state = [
            v if isinstance(v, Tensor) else self.nan
            for v in (
                getattr(norm, k, None) for k in ("running_mean", "running_var", "weight", "bias")
            )
        ]  # running_mean, running_var, gamma, beta: live tensors, copied when recorded
        self.grad: Tensor | None = None  # (4, C) gradient sums, filled during the backward
        self.batch = 0  # examples in the recorded forward

    def width(self) -> int:
        return len(self.rows) * self.channels + self.batch * len(self.units)


class Recorder:
    """Collects per-block statistics on armed steps; see the module docstring."""

    def __init__(self, model: Net, activation: str, tracked_units: int, device: torch.device):
        self.lo, self.hi = SATURATION[activation]
        self.slots = [_BlockSlot(n, b, tracked_units, device) for n, b in model.blocks()]
        fusable = {"relu": RELU, "linear": IDENTITY}.get(activation)
        for s in self.slots:
            if s.is_bn and s.block.norm_first and fusable is not None:
                s.act_spec = ActivationStats(fusable, self.lo, self.hi)
        self._by_block = {id(s.block): s for s in self.slots}
        self.device = device
        self.buffer = torch.empty(0, device=device)  # (capacity, width) rows, one per step
        self._write = kernels.record_row_fn(self.buffer)
        self.weights = [s.block.layer.weight for s in self.slots]
        # the layers' own biases: recorded only where one exists (off by default before BN)
        self.biases = [s.block.layer.bias for s in self.slots]
        if all(b is None for b in self.biases):
            self.biases = []
        self._nan1 = torch.full((1,), math.nan, device=device)
        # weight-gradient norms: written by C++ hooks during the backward where possible
        self.grad_norms = torch.full((len(self.slots),), math.nan, device=device)
        self._flag = torch.zeros(1, dtype=torch.long)
        self._watches: list[tuple[Tensor, int]] = []
        if self._write is cpu.record_row:
            self._watches = [
                (w, int(torch.ops.bncore.watch_grad_norm(w, self.grad_norms, i, self._flag)))
                for i, w in enumerate(self.weights)
            ]
        self.pending_steps: list[int] = []
        self.recorded = 0  # steps recorded so far, for channel_interval
        self.armed = False
        # this step's record, piece by piece (see kernels.record_row); None: a slot's gradient
        self._tensors: list[Tensor | None] = []
        self._kinds: list[int] = []
        self._lo: list[float] = []
        self._hi: list[float] = []
        self._grad_slots: list[tuple[int, _BlockSlot]] = []
        self._index: list[Tensor] = []

    def arm(self, on: bool) -> None:
        """Attach to (or detach from) every block for the next forward."""
        if on != self.armed:
            for s in self.slots:  # plain attributes, not submodules: skip nn.Module.__setattr__
                object.__setattr__(s.block, "probe", self if on else None)
                if s.act_spec is not None:
                    object.__setattr__(s.norm, "record_activation", s.act_spec if on else None)
            self._flag.fill_(int(on))
            self.armed = on
        if on:
            self._tensors, self._kinds, self._lo, self._hi = [], [], [], []
            self._grad_slots, self._index = [], []

    def observe(
        self, block: Block, pre_norm: Tensor, post_norm: Tensor, pre_act: Tensor, post_act: Tensor
    ) -> None:
        """During the forward: note what to record of this block (no computation yet)."""
        slot = self._by_block[id(block)]
        stats = slot.norm.stats if slot.is_bn else None
        inf = math.inf
        if stats is not None and stats.mean is not None and slot.norm.training:
            # BN's own batch statistics; its gradient sums are filled in place by its backward
            self._add([stats.mean, stats.var], COPY)
            slot.grad = stats.grad
        else:
            self._add([pre_norm, post_norm], MEAN_VAR, -inf, inf)
            slot.grad = None
            if pre_norm.requires_grad:
                pre_norm.register_hook(self._grad_hook(slot))
        if stats is not None and stats.act is not None:
            self._add([stats.act], COPY)  # measured by BN's forward
        else:
            self._add([post_act], MOMENTS, self.lo, self.hi)
        self._add(slot.state, COPY)  # running_mean, running_var, gamma, beta
        self._grad_slots.append((len(self._tensors), slot))
        self._add([None], COPY)  # the gradient sums, known after the backward
        self._add([pre_act], UNITS)
        self._index.append(slot.units)
        slot.batch = pre_act.shape[0]

    def _add(self, tensors: list, kind: int, lo: float = 0.0, hi: float = 0.0) -> None:
        n = len(tensors)
        self._tensors += tensors
        self._kinds += [kind] * n
        self._lo += [lo] * n
        self._hi += [hi] * n

    def _grad_hook(self, slot: _BlockSlot):
        """Without BN: the gradient at the norm position, summed per channel as BN does."""

        def hook(g: Tensor) -> None:
            g3 = g.detach().flatten(2) if g.dim() > 2 else g.detach().unsqueeze(2)
            sq = g3.square().sum((0, 2))
            slot.grad = torch.stack([slot.nan, g3.sum((0, 2)), sq, sq])

        return hook

    @torch.no_grad()
    def snapshot(self, step: int) -> None:
        """After the backward, before the optimizer step: record this step's row."""
        for i, slot in self._grad_slots:
            self._tensors[i] = slot.grad.reshape(-1) if slot.grad is not None else slot.nan4
        if self._watches:
            self._add([self.grad_norms], COPY)
        else:
            self._add(
                [w.grad if w.grad is not None else w.new_zeros(1) for w in self.weights], NORM
            )
        self._add(  # the layers' own biases (NaN without): zero where BN follows
            [b.grad if b is not None and b.grad is not None else self._nan1 for b in self.biases],
            NORM,
        )
        width = sum(s.width() for s in self.slots) + len(self.slots) + len(self.biases)
        row = len(self.pending_steps)
        if row >= self.buffer.shape[0] or self.buffer.shape[1] != width:
            self._grow(width)
        self._write(self.buffer[row], self._tensors, self._kinds, self._lo, self._hi, self._index)
        self.grad_norms.fill_(math.nan)
        self.pending_steps.append(step)

    def close(self) -> None:
        """Detach the gradient hooks from the model."""
        for weight, handle in self._watches:
            torch.ops.bncore.unwatch_grad_norm(weight, handle)
        self._watches = []

    def _grow(self, width: int) -> None:
        rows = len(self.pending_steps)
        if rows and self.buffer.shape[1] != width:
            raise RuntimeError("the record layout changed between flushes (batch size?)")
        bigger = torch.empty((max(64, 2 * self.buffer.shape[0]), width), device=self.device)
        if rows:
            bigger[:rows] = self.buffer[:rows]
        self.buffer = bigger

    def flush(self, channel_interval: int) -> Records:
        """All pending steps to the host in one transfer, as ``layers``/``channels`` rows.

        Rows are step-major, blocks in order within a step. Consecutive blocks of the same
        shape are summarized together, as (steps, blocks, channels) arrays.
        """
        if not self.pending_steps:
            return Records()
        steps = np.asarray(self.pending_steps, dtype=np.int64)
        raw = self.buffer[: len(steps)].cpu().numpy()  # a view on the CPU: used before reuse
        keep = (self.recorded + np.arange(len(steps))) % channel_interval == 0
        self.recorded += len(steps)
        self.pending_steps = []
        n = len(steps)
        # a copy: passed through as a column, it would be a view on the buffer (when n == 1),
        # and the next step would overwrite records already handed to the sink
        k, kb = len(self.slots), len(self.biases)
        grad_norms = raw[:, raw.shape[1] - k - kb : raw.shape[1] - kb].copy()
        bias_norms = raw[:, -kb:].copy() if kb else np.full((n, k), np.nan, np.float32)
        layers, channels = [], []
        offset = first = 0
        for group in _groups(self.slots):
            s, b = group[0], len(group)
            w = s.width()
            block_raw = raw[:, offset : offset + b * w].reshape(n, b, w)
            offset += b * w
            rows = self._rows(s, block_raw)  # each (S, B, C)
            values = block_raw[:, :, len(s.rows) * s.channels :].reshape(n, b, -1, len(s.units))
            pct = _percentiles(values.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # (S, B, 3, k)
            names = np.array([g.name for g in group])
            cols = summarize(
                rows, pct, grad_norms[:, first : first + b], bias_norms[:, first : first + b]
            )
            first += b
            layers.append(
                {
                    "step": np.repeat(steps, b),
                    "layer": np.tile(names, n),
                    **{k: v.reshape(-1) for k, v in cols.items()},
                }
            )
            if keep.any():
                kept_rows = {k: v[keep] for k, v in rows.items()}
                kept = {k: v.reshape(-1, s.channels) for k, v in channel_rows(kept_rows).items()}
                channels.append(
                    {
                        "step": np.repeat(steps[keep], b),
                        "layer": np.tile(names, int(keep.sum())),
                        **kept,
                    }
                )
        return Records(layers=_by_step(layers), channels=_by_step(channels))

    @staticmethod
    def _rows(s: _BlockSlot, block_raw: np.ndarray) -> dict[str, np.ndarray]:
        c = s.channels
        rows = {name: block_raw[..., j * c : (j + 1) * c] for j, name in enumerate(s.rows)}
        if s.is_bn:  # BN's output statistics are exact functions of what it recorded
            eps = s.block.norm.eps
            gamma = np.nan_to_num(rows["gamma"], nan=1.0)
            rows["post_mean"] = np.nan_to_num(rows["beta"], nan=0.0)
            rows["post_var"] = gamma**2 * rows["pre_var"] / (rows["pre_var"] + eps)
        return rows


def _percentiles(values: np.ndarray) -> np.ndarray:
    """QUANTILES of the last axis, linearly interpolated (numpy's and torch's default method);
    a sort and a gather, much faster than np.percentile on many short rows."""
    v = np.sort(values, axis=-1)
    pos = np.asarray(QUANTILES) / 100 * (v.shape[-1] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, v.shape[-1] - 1)
    return v[..., lo] + (pos - lo) * (v[..., hi] - v[..., lo])


def _groups(slots: list[_BlockSlot]) -> list[list[_BlockSlot]]:
    """Runs of consecutive blocks with the same record layout."""

    def layout(s: _BlockSlot) -> tuple:
        return s.rows, s.channels, s.width(), len(s.units), s.is_bn, getattr(s.norm, "eps", 0)

    out: list[list[_BlockSlot]] = []
    for s in slots:
        if out and layout(out[-1][0]) == layout(s):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _by_step(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-block tables, then order rows by step (stable: blocks stay in order)."""
    if not parts:
        return {}
    if len(parts) == 1:  # one group of blocks: already step-major
        return parts[0]
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(table["step"], kind="stable")
    return {k: v[order] for k, v in table.items()}

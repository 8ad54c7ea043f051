"""The mode-gap probe: one held batch through a model in eval mode and in train mode, leaving no
trace, and where eval mode parts from training, layer by layer.

A model trained with batch norm runs differently in the two modes: in training each BN
normalizes with the batch's own statistics, in eval mode with its running statistics. The
relative L2 distance between the two outputs of one batch is the **mode gap** (large: the model
evaluates unlike it trains, pitfall P7 of the BN doctor). Which layer it starts at is told by
each BN's eval-mode input against its running statistics, as RMS over channels c::

    eval_mean_gap = RMS_c (mean_c - running_mean_c) / sqrt(running_var_c + eps)
    eval_var_gap  = RMS_c (var_c - running_var_c) / (running_var_c + eps)

with mean_c and var_c (unbiased, as the running variance is) of what reaches the layer in the
eval-mode pass, the layers before it normalizing with their running statistics. One function,
:func:`mode_gap_probe`, for bnscope.client's opt-in probe and bncore's own evaluations
(bncore.run.engine).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModeGap", "mode_gap_probe"]


@dataclass
class ModeGap:
    """What :func:`mode_gap_probe` found: the mode gap (NaN where the model's output holds no
    tensor) and, per layer name, (eval_mean_gap, eval_var_gap)."""

    mode_gap: float
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)


def _output(out: Any) -> Tensor | None:
    """The tensor a model's output stands for: itself, its ``logits``, or the first tensor of a
    tuple, list or mapping."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = out.values() if isinstance(out, Mapping) else out
    if isinstance(values, tuple | list) or isinstance(out, Mapping):
        for v in values:
            if isinstance(v, Tensor):
                return v
    return None


def _input_gaps(norm: nn.Module, x: Tensor) -> Tensor | None:
    """(eval_mean_gap, eval_var_gap) of ``x`` reaching ``norm``, as a 2-vector on its device;
    None for a layer without running statistics."""
    rm, rv = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if not (isinstance(rm, Tensor) and isinstance(rv, Tensor)) or x.dim() < 2:
        return None
    eps = float(getattr(norm, "eps", 1e-5))
    x = x.detach().double()
    var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=1)
    scale = rv.double() + eps
    mean_gap = ((mean - rm.double()) / scale.sqrt()).square().mean().sqrt()
    var_gap = ((var - rv.double()) / scale).square().mean().sqrt()
    return torch.stack([mean_gap, var_gap])


def _devices(model: nn.Module, batch: Tensor) -> list[int]:
    """The CUDA devices whose random state the model's forwards may draw from."""
    found = {t.device.index or 0 for t in (*model.parameters(), *model.buffers(), batch)
             if t.device.type == "cuda"}  # fmt: skip
    return sorted(found)


@torch.no_grad()
def mode_gap_probe(
    model: nn.Module,
    batch: Tensor,
    norms: Mapping[str, nn.Module] | None = None,
    keep_rng: bool = True,
) -> ModeGap:
    """``batch`` through ``model`` once in eval mode and once in train mode, without a trace:
    every buffer (running statistics, batch counts, the model's own) is put back, so are the
    modules' train/eval modes, exactly, and (``keep_rng``) the CPU and CUDA random states that
    dropout or noise draw from; no gradient is taken.

    Train mode is the modes the model trains in: as the modules are when ``model`` is in
    training mode (a BN kept in eval mode, frozen, stays so), else ``model.train()``.

    ``norms``: the layers (by name) whose eval-mode input is compared with their running
    statistics (forward pre-hooks during the eval-mode pass; layers without running statistics
    are left out). The mode gap is ``||y_train - y_eval|| / ||y_eval||`` over the output.
    """
    modes = [(m, m.training) for m in model.modules()]
    trains_as_is = model.training
    buffers = [(b, b.clone()) for b in model.buffers()]
    found: dict[str, Tensor] = {}
    measuring = [False]

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if measuring[0] and args and isinstance(args[0], Tensor) and name not in found:
                gaps = _input_gaps(module, args[0])
                if gaps is not None:
                    found[name] = gaps

        return hook

    handles = [n.register_forward_pre_hook(pre_hook(name)) for name, n in (norms or {}).items()]
    rng: Any = contextlib.nullcontext()
    if keep_rng:
        rng = torch.random.fork_rng(devices=_devices(model, batch))
    try:
        with rng:
            model.eval()
            measuring[0] = True
            y_eval = _output(model(batch))
            measuring[0] = False
            if trains_as_is:
                for m, mode in modes:
                    m.training = mode
            else:
                model.train()
            y_train = _output(model(batch))
    finally:
        for h in handles:
            h.remove()
        for b, saved in buffers:
            b.copy_(saved)
        for m, mode in modes:
            m.training = mode
    gap = math.nan
    if y_eval is not None and y_train is not None:
        gap = float((y_train - y_eval).norm() / y_eval.norm().clamp_min(1e-12))
    names = list(found)
    values = torch.stack([found[n].cpu() for n in names]).tolist() if names else []
    return ModeGap(gap, {n: (v[0], v[1]) for n, v in zip(names, values, strict=True)})

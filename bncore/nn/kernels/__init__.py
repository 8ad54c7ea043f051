"""Batch-norm training kernels, one interface, several implementations.

Each kernel module has ``NAME``, ``supports(x, weight, bias)``,
``forward(x, weight, bias, eps, running)`` and ``backward(dy, x, mean, invstd, weight, need_dx)``
(see :mod:`bncore.nn.kernels.reference` for what they compute). :func:`train` runs a training-mode
batch norm with autograd on the best of them: the CPU kernel's own C++ autograd, or
:mod:`bncore.nn.kernels.autograd` around the others.

- ``reference``: the math in plain torch operations; any device and dtype; differentiable.
- ``cpu``: fused C++ operators for float32/float64 on the CPU (built on first use).
- ``compiled``: torch.compile of the reference (Triton on CUDA).

``select`` picks the fastest one that handles the input. ``BNCORE_KERNEL=reference|cpu|compiled``
in the environment, or :func:`use`, forces one (where it cannot take an input, the reference runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import Tensor

from bncore.nn.byproducts import Capture
from bncore.nn.kernels import autograd, cpu, reference
from bncore.nn.kernels.reference import Running

__all__ = [
    "KERNELS",
    "channel_moments",
    "forced",
    "record_row_fn",
    "reference",
    "select",
    "training_batch_norm",
    "use",
]

_compiled: ModuleType | None = None


def _compiled_kernel() -> ModuleType:
    """Imported lazily: torch.compile's import cost is paid only where it is used."""
    global _compiled
    if _compiled is None:
        from bncore.nn.kernels import compiled

        _compiled = compiled
    return _compiled


KERNELS = ("reference", "cpu", "compiled")


def _parse(name: str | None) -> str | None:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return None
    if name not in KERNELS:
        raise ValueError(f"unknown bncore kernel {name!r}: use auto, {', '.join(KERNELS)}")
    return name


_forced: str | None = _parse(os.environ.get("BNCORE_KERNEL"))


def forced() -> str | None:
    """The kernel forced by BNCORE_KERNEL or :func:`use`, if any."""
    return _forced


@contextmanager
def use(name: str | None) -> Iterator[None]:
    """Force a kernel ('reference', 'cpu', 'compiled'; None or 'auto' to choose) for a block."""
    global _forced
    previous, _forced = _forced, _parse(name)
    try:
        yield
    finally:
        _forced = previous


def select(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> ModuleType:
    """The kernel module to run a training-mode batch norm on ``x``."""
    name = _forced
    if name == "reference":
        return reference
    if name in (None, "cpu") and cpu.supports(x, weight, bias) and cpu.available():
        return cpu
    if name == "compiled" or (name is None and x.is_cuda):
        kernel = _compiled_kernel()
        if kernel.supports(x, weight, bias) and kernel.available():
            return kernel
    return reference


def training_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: Running | None,
    keep: Capture,
) -> Tensor:
    """Training-mode batch norm of ``x`` (autograd-aware) with the best kernel for it, keeping
    what ``keep`` asks for (see bncore.nn.byproducts.Capture): the hot path of the BatchNorm
    modules and of the function, which have checked everything else already."""
    n = x.numel()
    if n == x.shape[1]:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )
    if n == 0:
        return x.clone()
    if torch._C._are_functorch_transforms_active():
        # torch.func transforms reject autograd.Functions and bncore's fused operators have no
        # batching rule: the reference's plain torch operations (the same math), not recorded
        return reference.forward(x, weight, bias, eps, running).y
    kernel = select(x, weight, bias)
    if kernel is cpu and (keep.record is None or keep.record.row.dtype == x.dtype):
        return cpu.training_batch_norm(x, weight, bias, eps, running, keep)
    return autograd.TrainingBatchNorm.apply(x, weight, bias, eps, running, kernel, keep)


def _fused_cpu(x: Tensor, dtypes: tuple[torch.dtype, ...] = cpu.DTYPES) -> bool:
    return (
        _forced in (None, "cpu")
        and x.device.type == "cpu"
        and x.dtype in dtypes
        and cpu.available()
    )


def channel_moments(x: Tensor, lo: float = float("-inf"), hi: float = float("inf")) -> Tensor:
    """Per-channel (mean, var, fraction <= lo, fraction >= hi) of an (N, C, *) tensor, (4, C)."""
    if _fused_cpu(x):
        return cpu.channel_moments(x, lo, hi)
    return reference.channel_moments(x, lo, hi)


def record_row_fn(out: Tensor) -> Callable[..., None]:
    """The function that writes recorded steps into ``out`` (see reference.record_row): the
    fused one where it applies (it releases the GIL, so it can run beside training)."""
    return cpu.record_row if _fused_cpu(out, (torch.float32,)) else reference.record_row

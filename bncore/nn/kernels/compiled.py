"""The reference math compiled by torch.compile: Triton kernels on CUDA, C++ on the CPU.

The same functions as :mod:`bncore.nn.kernels.reference`, fused by the compiler; it is the default
on CUDA. If compiling fails (no Triton, no compiler), it warns once and runs the reference instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from bncore.nn.kernels import reference
from bncore.nn.kernels.reference import Forward

log = logging.getLogger(__name__)

NAME = "compiled"
R = TypeVar("R")

_failed: str | None = None
_forward = torch.compile(reference.normalize_batch, fullgraph=True)
_backward = torch.compile(reference.backward, fullgraph=True)


def _guarded(compiled: Callable[..., R], fallback: Callable[..., R], *args: Any) -> R:
    global _failed
    if _failed is None:
        try:
            return compiled(*args)
        except Exception as exc:  # any compiler failure: the reference still gives the answer
            _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            log.warning(
                "bncore: torch.compile kernel unavailable, using the reference (%s)", _failed
            )
    return fallback(*args)


def available() -> bool:
    """False once compiling has failed in this process."""
    return _failed is None


def unavailable_reason() -> str | None:
    return _failed


def supports(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Any floating input; chosen automatically on CUDA only (see kernels.select)."""
    return x.is_floating_point()


def _normalize_batch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Forward:
    return _guarded(_forward, reference.normalize_batch, x, weight, bias, eps)


#: reference.forward, its normalization compiled.
forward = functools.partial(reference.forward, normalize=_normalize_batch)
#: reference.backward, compiled.
backward = functools.partial(_guarded, _backward, reference.backward)

"""A watched batch norm inside a torch.compile graph, recorded without a graph break.

Under torch.compile, dynamo traces the watcher's ``F.batch_norm``. Where a watcher owns the
layer's tensors (found while tracing: the lookup is guarded like any attribute read), the graph
gets what ``torch.batch_norm`` itself decomposes to in training, ``aten._native_batch_norm_legit``
(so the compiled watched model computes bit for bit what the compiled unwatched one does,
forward, backward and running statistics), and three side-effect operators that run when the
graph runs, where dynamo does not look:

- ``bnscope::record_forward`` hands the layer the batch mean and 1/sqrt(var + eps) the graph
  computed (copied: the graph may reuse their memory), with the counts of the forward;
- ``bnscope::record_grad`` hands it the gradient reaching BN's output (a hook on the output)
  and the gradient leaving through its input (an identity autograd function on the input), as
  one fused reduction each, on measured steps, and counts the backward passes gamma does not.

One graph for the whole model, then, and no recompilation for each BN width (a graph break at
each BN made dynamo compile every module frame once per width, past its recompile limit).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["WATCHERS", "define_operators", "traced_batch_norm"]


#: The attached watchers (bncore.record.watcher keeps this list): each offers ``_paused``,
#: ``_owners`` (read while tracing) and ``compiled_forward``/``compiled_grad`` (called as the
#: graph runs; False where the layer is not theirs).
WATCHERS: list[Any] = []


@functools.cache
def define_operators() -> None:
    """Define the operators (once per process, when a watcher first attaches)."""

    @torch.library.custom_op("bnscope::record_forward", mutates_args=())
    def record_forward(
        mean: Tensor, invstd: Tensor, key: int, n: int, m: int, grad: bool, dtype: str,
        eps: float, momentum: float,
    ) -> None:  # fmt: skip
        for watcher in WATCHERS:
            if watcher.compiled_forward(key, mean, invstd, (n, m, grad), dtype, eps, momentum):
                return

    @record_forward.register_fake
    def _(*args: Any) -> None:
        return None

    @torch.library.custom_op("bnscope::record_grad", mutates_args=())
    def record_grad(grad: Tensor, key: int, side: int) -> None:
        for watcher in WATCHERS:
            if watcher.compiled_grad(key, grad, side):
                return

    @record_grad.register_fake
    def _(*args: Any) -> None:
        return None

    from torch.fx.node import has_side_effect

    has_side_effect(torch.ops.bnscope.record_forward.default)  # returns nothing: keep it
    has_side_effect(torch.ops.bnscope.record_grad.default)


class _InputGrad(torch.autograd.Function):
    """The identity; its backward hands the gradient leaving through BN's input to the layer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, key: int) -> Tensor:
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        torch.ops.bnscope.record_grad(grad, ctx.key, 1)
        return grad, None


def _output_grad(key: int, grad: Tensor) -> None:
    torch.ops.bnscope.record_grad(grad, key, 0)


def _key(*tensors: Tensor | None) -> int | None:
    """The module that owns one of the tensors, for a watcher that records it now: its id."""
    for watcher in WATCHERS:
        if watcher._paused:
            continue
        for t in tensors:
            if t is None:
                continue
            hit = watcher._owners.get(id(t))
            if hit is not None and hit[0] is t:
                return id(hit[2]) if hit[2].training else None
    return None


def traced_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor | None:
    """While dynamo traces a training-mode batch norm: the watched layer's, in the graph and
    recorded; None where no watcher owns it (torch's own then goes in the graph)."""
    key = _key(running_mean, weight, bias, running_var)
    if key is None or input.numel() == 0:
        return None
    x = _InputGrad.apply(input, key) if input.requires_grad else input
    if running_mean is None or running_var is None:
        y, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(
            x, weight, bias, True, momentum, eps
        )
    else:
        y, mean, invstd = torch.ops.aten._native_batch_norm_legit(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
    m = input.numel() // input.shape[1]
    torch.ops.bnscope.record_forward(
        mean, invstd, key, input.shape[0], m, torch.is_grad_enabled(), str(input.dtype),
        float(eps), math.nan if momentum is None else float(momentum),
    )  # fmt: skip
    if y.requires_grad:
        y.register_hook(functools.partial(_output_grad, key))
    return y

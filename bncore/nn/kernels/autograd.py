"""Autograd for the kernels written in Python (reference, compiled).

The fused CPU kernel carries its own autograd in C++; this Function gives the others the same
contract: a training-mode forward that records the batch statistics and a (4, C) gradient-sums
tensor that the backward fills in place (see :class:`bncore.nn.byproducts.BNStats`).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from bncore.nn.byproducts import Capture
from bncore.nn.kernels import reference
from bncore.nn.kernels.reference import Running


class TrainingBatchNorm(torch.autograd.Function):
    """y = BN(x) with batch statistics, differentiable twice (through the reference)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: Running | None,
        kernel: ModuleType,
        keep: Capture,
    ) -> Tensor:
        stats, act, record = keep
        out = kernel.forward(x, weight, bias, eps, running)
        act_stats = None if act is None else reference.activation_stats(out.y, act)
        if record is not None:
            reference.write_record(
                record, out.y, out.mean, out.var, running, weight, bias, act_stats
            )
            grad = record.grad
            act_stats = None if act is None else record.act
        else:
            grad = torch.full((4, x.shape[1]), float("nan"), dtype=out.mean.dtype, device=x.device)
        # torch saves None too; its stub types the arguments Tensor
        ctx.save_for_backward(x, weight, out.mean, out.invstd)  # type: ignore[arg-type]
        ctx.kernel, ctx.eps, ctx.grad = kernel, eps, grad  # type: ignore[attr-defined]
        ctx.bias_dtype = None if bias is None else bias.dtype  # type: ignore[attr-defined]
        if stats is not None:
            stats.record(out.mean, out.var, grad, act_stats)
        return out.y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        kernel = ctx.kernel  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            # create_graph=True: the statistics depend on x too, so differentiate through them.
            mean, var = reference.batch_stats(reference.ncl_view(x))
            invstd = torch.rsqrt(var + ctx.eps)  # type: ignore[attr-defined]
            kernel = reference
        g = kernel.backward(dy, x, mean, invstd, weight, need_dx)
        with torch.no_grad():
            rows = [g.sum_dy_xhat, g.sum_dy, g.dy_sq]
            ctx.grad[: len(rows)].copy_(torch.stack(rows))  # type: ignore[attr-defined]
            if g.dx_sq is not None:
                ctx.grad[3].copy_(g.dx_sq)  # type: ignore[attr-defined]
        dw = _cast(g.sum_dy_xhat, weight.dtype) if need_w else None
        db = _cast(g.sum_dy, ctx.bias_dtype) if need_b else None  # type: ignore[attr-defined]
        return g.dx if need_dx else None, dw, db, None, None, None, None


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)

r"""Synchronized batch normalization: in data-parallel training, every replica normalizes with the
statistics of the global batch (all replicas' examples), not with its own.

Each replica computes its batch's per-channel mean and biased variance and how many values they
are over; one all-gather gives every replica all of them, combined exactly (Chan et al.'s
parallel variance) into the global batch's

.. math::
    \mu = \frac{\sum_r n_r \mu_r}{N}, \qquad
    \sigma^2 = \frac{\sum_r n_r \left(\sigma_r^2 + (\mu_r - \mu)^2\right)}{N}, \qquad N = \sum_r n_r

and the running buffers move towards those (the variance unbiased over N). In the backward one
all-reduce sums :math:`\sum dy` and :math:`\sum dy \hat{x}` over the replicas for the input
gradient; gamma's and beta's gradients stay each replica's own sums, as in
:class:`torch.nn.SyncBatchNorm` (DistributedDataParallel reduces them with every other
parameter's). Results match torch.nn's: the same as :class:`torch.nn.BatchNorm2d` over the
concatenated global batch. Unlike torch.nn's, it runs on the CPU (gloo) as well as on CUDA (NCCL).

The layer keeps its replica's own batch statistics beside the global ones it normalized with
(:attr:`SyncBatchNorm.replica`): how far each replica's batch is from the global batch is what
synchronizing removes.

Under torch.func transforms (grad, vmap, jacrev, functional_call, ...), which refuse the fused
Function above, the same math runs in plain torch operations around one collective,
:class:`_AllReduceSum`, whose derivative and batching rule are written out: an all-reduce's
adjoint is itself (the backward sums every replica's cotangent, as the Function's backward
does), and it sums a batched tensor element by element whatever its batch dimension. Every
replica must then transform alike (the same vmap sizes), as every collective needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bncore.nn.batchnorm import BatchNorm, under_transform
from bncore.nn.byproducts import ActivationStats, Capture, RecordTarget
from bncore.nn.kernels import reference
from bncore.nn.kernels.reference import Running

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm"]


def _group_size(group: Any) -> int:
    """Replicas in ``group`` (1 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """gamma (x - mean) / sqrt(var + eps) + beta, in one pass (torch's eval-mode batch norm)."""
    if mean.dtype != x.dtype:  # half inputs: statistics in float32
        return reference.normalize(reference.ncl_view(x), mean, torch.rsqrt(var + eps), weight,
                                   bias).view(x.shape)  # fmt: skip
    return nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


class _Sync(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running: Running | None,
        group: Any,
        out: list[Any],
        act: ActivationStats | None,
        record: RecordTarget | None,
    ) -> Tensor:
        x3 = reference.ncl_view(x)
        channels = x3.shape[1]
        acc = reference.opmath_dtype(x.dtype)
        count = reference.values_per_channel(x)
        if count:  # one pass, torch's own batch-norm statistics kernel
            mean_r, var_r = (t.to(acc) for t in torch.batch_norm_update_stats(x, None, None, 0.0))
        else:  # an empty replica still takes part in the collective
            mean_r = var_r = x3.new_zeros(channels, dtype=acc)
        mine = torch.cat([mean_r, var_r, mean_r.new_full((1,), count)])
        world = _group_size(group)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        every = torch.stack(parts)  # (replicas, 2C + 1)
        means, variances, counts = every[:, :channels], every[:, channels:-1], every[:, -1:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).square())).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        n = int(total.item())  # the host needs it for Bessel's correction, as torch.nn does
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {n} over all replicas"
            )
        if running is not None:
            reference.update_running(running, mean, var, n)
        y = _normalize(x, mean, var, weight, bias, eps)
        act_stats = None if act is None else reference.activation_stats(y, act)
        if record is not None:  # what bncore's BatchNorm writes into a recorder's row
            reference.write_record(record, y, mean, var, running, weight, bias, act_stats)
            grad = record.grad
            act_stats = None if act is None else record.act
        else:
            grad = torch.full((4, channels), float("nan"), dtype=acc, device=x.device)
        ctx.save_for_backward(x3, weight, mean, invstd)
        ctx.group, ctx.n, ctx.grad_rows, ctx.var, ctx.eps = group, n, grad, var, eps
        ctx.recorded = record is not None
        out[:] = [mean.detach(), var.detach(), mean_r.detach(), var_r.detach(), grad, act_stats]
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x3, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        dy3 = reference.ncl_view(dy.contiguous()).to(acc)
        # x_hat in one pass, centred before it is scaled: exact when |mean| >> std
        xhat = reference.ncl_view(_normalize(x3, mean, ctx.var, None, None, ctx.eps)).to(acc)
        sum_dy = dy3.sum((0, 2))
        sum_dy_xhat = (dy3 * xhat).sum((0, 2))
        dx3: Tensor | None = None
        dx: Tensor | None = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.group)
            g_dy, g_dy_xhat = both.chunk(2)
            scale = invstd if weight is None else invstd * weight.to(acc)
            n = ctx.n
            # dx = scale * (dy - g_dy/n - xhat * g_dy_xhat/n)
            b = -scale * g_dy_xhat / n
            c = -scale * g_dy / n
            dx3 = torch.addcmul(c[:, None], dy3, scale[:, None]).addcmul_(xhat, b[:, None])
            dx = dx3.to(dy.dtype).view(dy.shape)
        with torch.no_grad():  # what this replica's backward saw (BNStats.GRAD_ROWS)
            nan = torch.full_like(sum_dy, torch.nan)
            dy_sq = dx_sq = nan  # two more passes: taken on the steps a recorder asked for
            if ctx.recorded:
                dy_sq = dy3.square().sum((0, 2))
                dx_sq = dx3.square().sum((0, 2)) if dx3 is not None else nan
            ctx.grad_rows.copy_(torch.stack([sum_dy_xhat, sum_dy, dy_sq, dx_sq]))
        dw = (
            sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        )
        db = sum_dy.to(dy.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the group's replicas, for torch.func: differentiable (the
    adjoint of an all-reduce is an all-reduce) and batchable (element by element)."""

    @staticmethod
    def forward(t: Tensor, group: Any) -> Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], t: Tensor, group: Any) -> tuple[Tensor, Any]:
        return _AllReduceSum.apply(t, group), in_dims[0]


def _traceable_sync(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: Running | None,
    group: Any,
) -> tuple[Tensor, list[Any]]:
    """:func:`sync_batch_norm` in plain torch operations and :class:`_AllReduceSum`, for
    torch.func transforms: two passes over the global batch (its mean, then the squares about
    it: no cancellation), not recorded."""
    x3 = reference.ncl_view(x)
    acc = reference.opmath_dtype(x.dtype)
    xa = x3.to(acc)
    count = torch.tensor([float(reference.values_per_channel(x))], dtype=acc)
    dist.all_reduce(count, group=group)  # not transformed: how many values, on every replica
    n = int(count.item())
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {n} over all replicas"
        )
    mean = _AllReduceSum.apply(xa.sum((0, 2)), group) / n
    var = _AllReduceSum.apply((xa - mean[:, None]).square().sum((0, 2)), group) / n
    if running is not None:  # torch.func refuses this mutation, as it does torch.nn's
        reference.update_running(running, mean.detach(), var.detach(), n)
    y = reference.normalize(x3, mean, torch.rsqrt(var + eps), weight, bias).view(x.shape)
    nan = torch.full((4, x3.shape[1]), float("nan"), dtype=acc)
    var_r, mean_r = torch.var_mean(xa.detach(), (0, 2), correction=0)
    return y, [mean.detach(), var.detach(), mean_r, var_r, nan, None]


def sync_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: Running | None = None,
    group: Any = None,
    act: ActivationStats | None = None,
    record: RecordTarget | None = None,
) -> tuple[Tensor, list[Any]]:
    """Training-mode batch norm over the global batch of ``group``'s replicas: the output, and
    [global mean, global biased variance, this replica's mean, this replica's variance, the
    (4, C) gradient sums its backward fills (BNStats.GRAD_ROWS), the activation's statistics
    or None]. ``act`` and ``record`` as for bncore's BatchNorm (a recorder's row); under
    torch.func transforms nothing is recorded."""
    if under_transform(x):
        return _traceable_sync(x, weight, bias, eps, running, group)
    found: list[Any] = []
    y = _Sync.apply(x, weight, bias, eps, running, group, found, act, record)
    return y, found


class SyncBatchNorm(BatchNorm):
    r"""Batch normalization over the global batch of a process group (any input of shape
    (N, C, ...)); a drop-in for :class:`torch.nn.SyncBatchNorm`, on the CPU too.

    In training, with torch.distributed initialized and more than one replica in
    ``process_group`` (default: the world), each forward normalizes with the global batch's
    statistics; otherwise it is bncore's BatchNorm. After a synchronized forward,
    :attr:`replica` holds this replica's own batch (mean, biased variance), and ``stats`` the
    global ones it normalized with.
    """

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self.replica: tuple[Tensor, Tensor] | None = None

    def forward(self, input: Tensor) -> Tensor:
        group = self.process_group
        if not self.training or self.frozen or _group_size(group) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm({self.num_features}) got input with {input.shape[1]} channels "
                f"(shape {tuple(input.shape)}); dim 1 must be the channels"
            )
        running = None
        rm, rv = self._buffers["running_mean"], self._buffers["running_var"]
        if self.track_running_stats and rm is not None and rv is not None:
            running = Running(rm, rv, self._running_factor(), self.unbiased_running_var)
        keep = Capture.of(self.stats, self.recording, input)
        y, (mean, var, mean_r, var_r, grad, act) = sync_batch_norm(
            input, self.weight, self.bias, self.eps, running, group, keep.act, keep.record
        )
        if not under_transform(input):  # a transform's values are its own (not recorded)
            self.stats.record(mean, var, grad, act)
            self.replica = (mean_r, var_r)
        return y


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """``module`` with every bncore BatchNorm replaced by a :class:`SyncBatchNorm` with the same
    parameters, buffers and mode (torch.nn's ``convert_sync_batchnorm``, for bncore's layers)."""
    out = module
    if isinstance(module, BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        out.unbiased_running_var = module.unbiased_running_var
        with torch.no_grad():
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out

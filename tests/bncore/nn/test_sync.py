"""bncore's synchronized BN over real torch.distributed processes (gloo, 127.0.0.1): the same as
torch.nn's BatchNorm over the global batch, which is what torch.nn.SyncBatchNorm computes (and
which it cannot run on the CPU); on CUDA, against torch.nn.SyncBatchNorm itself (NCCL)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bncore
from bncore.nn.sync import SyncBatchNorm, convert_sync_batchnorm
from tests.helpers import on_ranks

WORLD = 2
SHAPES = [(8, 3), (6, 4, 5), (4, 3, 5, 7), (2, 2, 3, 4, 5)]
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _check_against_the_global_batch(rank: int, shape: tuple, momentum: float | None,
                                    sizes: tuple[int, int]) -> None:  # fmt: skip
    """This rank's slice of one global batch through SyncBatchNorm, against torch.nn's BN on
    the whole batch, computed here too."""
    torch.manual_seed(0)  # every rank makes the same global batch and weights
    c = shape[1]
    total = sum(sizes)
    x = torch.randn(total, *shape[1:], dtype=torch.float64) * 3 + 1
    w = torch.randn(total, *shape[1:], dtype=torch.float64)  # loss = sum(y * w)
    ref = TORCH_BN[len(shape)](c, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    sync = SyncBatchNorm(c, momentum=momentum).double()
    sync.load_state_dict(ref.state_dict())
    start = sum(sizes[:rank])
    mine = x[start : start + sizes[rank]].clone().requires_grad_()
    full = x.clone().requires_grad_()
    for _ in range(2):  # two steps: the running statistics move twice
        ref.zero_grad()
        sync.zero_grad()
        y_ref = ref(full)
        y = sync(mine)
        (y_ref * w).sum().backward()
        (y * w[start : start + sizes[rank]]).sum().backward()
    torch.testing.assert_close(y, y_ref[start : start + sizes[rank]])
    torch.testing.assert_close(mine.grad, full.grad[start : start + sizes[rank]])
    torch.testing.assert_close(sync.running_mean, ref.running_mean)
    torch.testing.assert_close(sync.running_var, ref.running_var)
    assert int(sync.num_batches_tracked) == 2
    for got, want in ((sync.weight.grad, ref.weight.grad), (sync.bias.grad, ref.bias.grad)):
        summed = got.clone()
        dist.all_reduce(summed)  # each replica's own share, summed as DDP would
        torch.testing.assert_close(summed, want)
    # the replica's own statistics beside the global ones it normalized with
    dims = [0, *range(2, len(shape))]
    var_r, mean_r = torch.var_mean(mine.detach(), dims, correction=0)
    torch.testing.assert_close(sync.replica[0], mean_r)
    torch.testing.assert_close(sync.replica[1], var_r)
    var_g, mean_g = torch.var_mean(x, dims, correction=0)
    torch.testing.assert_close(sync.stats.mean, mean_g)
    torch.testing.assert_close(sync.stats.var, var_g)
    assert torch.isfinite(sync.stats.grad[:2]).all()  # gamma's and beta's: this replica's
    assert torch.isnan(sync.stats.grad[2:]).all()  # squared norms: only for a recorder
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(mine.detach()), ref(full.detach())[start : start + sizes[rank]])


def _gloo_checks(rank: int) -> None:
    torch.set_num_threads(1)
    for shape in SHAPES:
        for momentum in (0.1, None):
            for sizes in ((shape[0] // 2, shape[0] - shape[0] // 2), (1, shape[0])):
                _check_against_the_global_batch(rank, shape, momentum, sizes)
    # float32, a mean 10^4 standard deviations from zero: no cancellation in the gradient
    torch.manual_seed(2)
    x = (torch.randn(16, 4, 9) * 0.01 + 100).requires_grad_()
    w = torch.randn(16, 4, 9)
    ref = nn.BatchNorm1d(4).double()
    full = x.detach().double().requires_grad_()
    (ref(full) * w.double()).sum().backward()
    mine = x.detach()[8 * rank : 8 * rank + 8].clone().requires_grad_()
    sync = SyncBatchNorm(4)
    (sync(mine) * w[8 * rank : 8 * rank + 8]).sum().backward()
    want = full.grad[8 * rank : 8 * rank + 8].float()
    torch.testing.assert_close(mine.grad, want, rtol=1e-3, atol=1e-3 * want.abs().max())
    # a model converted: its BN layers become synchronized, with their state
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), bncore.BatchNorm1d(3), nn.ReLU())
    model[1].running_mean.fill_(0.5)
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and converted[1].running_mean[0] == 0.5
    assert converted[1].weight is model[1].weight


def _nccl_checks(rank: int) -> None:
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    x = torch.randn(2 * WORLD, 8, 6, 6, device="cuda")
    ours, theirs = SyncBatchNorm(8).cuda(), nn.SyncBatchNorm(8).cuda()
    mine = x[2 * rank : 2 * rank + 2].clone().requires_grad_()
    again = mine.detach().clone().requires_grad_()
    ours(mine).square().sum().backward()
    theirs(again).square().sum().backward()
    torch.testing.assert_close(mine.grad, again.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(300)
def test_sync_bn_over_two_gloo_processes_is_bn_over_the_global_batch(tmp_path):
    on_ranks(_gloo_checks, tmp_path, "gloo")


def test_without_a_process_group_it_is_bncores_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5)
    sync, ref = SyncBatchNorm(3), nn.BatchNorm1d(3)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    assert sync.replica is None
    with pytest.raises(ValueError, match="at least 2D"):
        sync(torch.randn(3))


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="NCCL needs a GPU per process")
def test_sync_bn_equals_torch_sync_batch_norm_over_nccl(tmp_path):
    on_ranks(_nccl_checks, tmp_path, "nccl")

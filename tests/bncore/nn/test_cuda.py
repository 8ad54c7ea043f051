"""CUDA: the same semantics on the GPU. Skipped cleanly where there is none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bncore
from bncore.nn import kernels
from tests.helpers import check_cuda_kernel_choice

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("kernel_name", ["reference", "compiled"])
@pytest.mark.parametrize("shape", [(64, 32), (8, 16, 10, 10), (4, 8, 50)])
def test_matches_torch_on_cuda(kernel_name, shape):
    dev = torch.device("cuda")
    c = shape[1]
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(c, device=dev)
    ours = (bncore.BatchNorm2d if len(shape) == 4 else bncore.BatchNorm1d)(c, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    with kernels.use(kernel_name):
        for step in range(6):
            ref.train(step != 4)
            ours.train(step != 4)
            x = torch.randn(shape, device=dev, generator=gen) * 2 + step
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = ref(x1), ours(x2)
            torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-4)
            dy = torch.randn(shape, device=dev, generator=gen)
            g1 = torch.autograd.grad(y1, (x1, ref.weight, ref.bias), dy)
            g2 = torch.autograd.grad(y2, (x2, ours.weight, ours.bias), dy)
            for a, b in zip(g2, g1, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-4, atol=1e-4)
    assert ours.stats.mean.device.type == "cuda"  # statistics stay on the device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_is_the_default_on_cuda(monkeypatch, dtype):
    """On CUDA the compiled kernel runs, the reference only once compiling has failed or when
    forced; the fused CPU kernel never (tests/bncore/nn/test_kernels.py checks the same on the
    CPU with fake CUDA tensors)."""

    x = torch.randn(4, 3, device="cuda", dtype=dtype)
    w, b = torch.ones(3, device="cuda", dtype=dtype), torch.zeros(3, device="cuda", dtype=dtype)
    check_cuda_kernel_choice(x, w, b, monkeypatch)


def test_the_compiled_kernel_compiles_on_cuda():
    """Where Triton is installed, the default on CUDA is compiled code, not the fallback."""
    pytest.importorskip("triton", reason="no Triton: torch.compile falls back to the reference")
    from bncore.nn.kernels import compiled

    layer = bncore.BatchNorm2d(8).cuda()
    with kernels.use(None):
        layer(torch.randn(16, 8, 4, 4, device="cuda"))
    assert compiled.available(), compiled.unavailable_reason()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(dtype):
    x = (torch.randn(32, 8, 6, 6, device="cuda") * 3 + 1).to(dtype)
    ref, ours = nn.BatchNorm2d(8).cuda(), bncore.BatchNorm2d(8).cuda()
    torch.testing.assert_close(ours(x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=1e-3)


def test_momentum_none_needs_no_host_sync():
    layer = bncore.BatchNorm1d(4, momentum=None).cuda()
    x = torch.randn(16, 4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")

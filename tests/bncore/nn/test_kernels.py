"""The fast kernels against the readable reference, and the fallbacks when they can't run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bncore.nn import kernels
from bncore.nn.kernels import cpu, reference
from bncore.nn.kernels.reference import Running
from tests.helpers import check_cuda_kernel_choice

# Shapes that reach every branch of bn_cpu.cpp: runs longer than kRun (2048), row blocks past
# kRowBlock (64), odd channel counts, one channel, and enough work to go multi-threaded; planes
# summed per plane (wide, or too many columns: bn_cpu.h's `folded`) and folded into rows (tiny
# or few), with and without a remainder past the SIMD lanes.
CASES = [
    ((3, 5, 4100), None),
    ((150, 7), None),
    ((1000, 33), None),
    ((2, 1, 30), None),
    ((5, 3, 1), None),
    ((64, 16, 8, 8), None),
    ((200, 3, 40), None),
    ((5, 700, 4, 5), None),
    ((70, 6, 3, 3), None),
    ((300, 40, 3, 3), None),
    ((9, 2, 2), None),
    ((16, 13, 9, 9), torch.channels_last),
    ((40, 3, 5), "rows3d"),
]


def _make(shape, fmt, dtype, gen):
    x = torch.randn(shape, generator=gen, dtype=dtype) * 4 + 3
    if fmt == torch.channels_last:
        x = x.contiguous(memory_format=fmt)
    elif fmt == "rows3d":  # (N, C, L) stored as (N, L, C): channels innermost
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


@pytest.fixture
def fused():
    if not cpu.available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu.unavailable_reason()}")


@pytest.mark.parametrize("shape,fmt", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_cpu_kernel_matches_reference(fused, shape, fmt, dtype, affine):
    gen = torch.Generator().manual_seed(1)
    x = _make(shape, fmt, dtype, gen)
    assert cpu.supports(x, None, None), cpu.memory_layout(x)
    c = shape[1]
    w = torch.rand(c, generator=gen, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, generator=gen, dtype=dtype) if affine else None
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    run_f = Running(torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 1, 0.3)
    run_r = Running(run_f.mean.clone(), run_f.var.clone(), 0.3)

    fast = cpu.forward(x, w, b, 1e-5, run_f)
    ref = reference.forward(x, w, b, 1e-5, run_r)
    for name in fast._fields:
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), **tol, msg=name)
    assert fast.y.stride() == x.stride()
    torch.testing.assert_close(run_f.mean, run_r.mean, **tol)
    torch.testing.assert_close(run_f.var, run_r.var, **tol)

    for need_dx in (True, False):
        g_fast = cpu.backward(dy, x, fast.mean, fast.invstd, w, need_dx)
        g_ref = reference.backward(dy, x, ref.mean, ref.invstd, w, need_dx)
        for name in g_fast._fields:
            a, e = getattr(g_fast, name), getattr(g_ref, name)
            assert (a is None) == (e is None), name
            if a is not None:
                scale = dict(tol, atol=tol["atol"] * max(1.0, float(e.abs().max())))
                torch.testing.assert_close(a, e, **scale, msg=name)


@pytest.mark.parametrize("shape,fmt", CASES)
def test_cpu_channel_moments_match_reference(fused, shape, fmt):
    x = _make(shape, fmt, torch.float32, torch.Generator().manual_seed(2))
    for lo, hi in ((3.0, 5.0), (float("-inf"), float("inf"))):
        torch.testing.assert_close(
            cpu.channel_moments(x, lo, hi), reference.channel_moments(x, lo, hi),
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


def test_cpu_kernel_takes_gradient_in_another_layout(fused):
    x = torch.randn(8, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(8, 6, 5, 5)  # contiguous, unlike x
    out = cpu.forward(x, None, None, 1e-5)
    g1 = cpu.backward(dy, x, out.mean, out.invstd, None)
    g2 = reference.backward(dy, x, out.mean, out.invstd, None)
    torch.testing.assert_close(g1.dx, g2.dx, rtol=1e-4, atol=1e-4)


def test_running_update_with_tensor_momentum_and_other_dtype(fused):
    """The paths the kernel leaves to the reference: 0-d momentum, float64 buffers."""
    x = torch.randn(12, 4)
    run = Running(
        torch.zeros(4, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64),
        torch.tensor(0.5, dtype=torch.float64),
    )
    cpu.forward(x, None, None, 1e-5, run)
    torch.testing.assert_close(run.mean, 0.5 * x.double().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.var, 0.5 + 0.5 * x.double().var(0), rtol=1e-5, atol=1e-6)


def test_select_picks_the_fast_kernel_where_it_applies(fused):
    assert kernels.select(torch.randn(4, 3), None, None) is cpu
    assert kernels.select(torch.randn(4, 3, dtype=torch.float16), None, None) is reference
    assert kernels.select(torch.randn(4, 3), torch.ones(3, dtype=torch.float64), None) is reference
    with kernels.use("reference"):
        assert kernels.select(torch.randn(4, 3), None, None) is reference
    assert kernels.forced() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_select_picks_the_compiled_kernel_for_cuda_inputs(monkeypatch, dtype):
    """Which kernel runs for a CUDA input, checked without a GPU: fake CUDA tensors (metadata
    only) go through the same choice as real ones (tests/bncore/nn/test_cuda.py does it on a
    GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 3, 5, device="cuda", dtype=dtype)
        w, b = (
            torch.empty(3, device="cuda", dtype=dtype),
            torch.empty(3, device="cuda", dtype=dtype),
        )
    assert x.is_cuda and not x.is_cpu
    check_cuda_kernel_choice(x, w, b, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_never_picks_the_compiled_kernel_by_itself_on_the_cpu(monkeypatch, dtype):
    from bncore.nn.kernels import compiled

    monkeypatch.setattr(compiled, "available", lambda: True)
    monkeypatch.setattr(cpu, "available", lambda: False)  # not even without the fused kernel
    x = torch.randn(4, 3, dtype=dtype)
    assert kernels.select(x, None, None) is reference
    with kernels.use("compiled"):  # forced, it runs on the CPU too
        assert kernels.select(x, None, None) is compiled


def test_unknown_kernel_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown bncore kernel 'fast'"), kernels.use("fast"):
        pass


def _run_isolated(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


CHECK_AGAINST_TORCH = """
    import torch, bncore
    from bncore.nn.kernels import cpu
    x = torch.randn(16, 4, 3, requires_grad=True)
    ours, ref = bncore.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    torch.testing.assert_close(ours(x), ref(x))
    print("kernel available:", cpu.available(), "|", cpu.unavailable_reason())
"""


def test_falls_back_to_reference_without_a_compiler(tmp_path):
    result = _run_isolated(
        CHECK_AGAINST_TORCH, PATH=str(tmp_path), CXX="", BNCORE_CACHE_DIR=str(tmp_path / "cache")
    )
    assert result.returncode == 0, result.stderr
    assert "kernel available: False | no C++ compiler found" in result.stdout
    assert "using the reference" in result.stderr  # warned once, clearly


def test_falls_back_when_the_build_fails(tmp_path):
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = _run_isolated(
        CHECK_AGAINST_TORCH, CXX=str(fake), BNCORE_CACHE_DIR=str(tmp_path / "cache")
    )
    assert result.returncode == 0, result.stderr
    assert "kernel available: False | error: this compiler is broken" in result.stdout
    assert cpu.building_message() in result.stderr and "did not build" in result.stderr


def test_a_build_says_so_while_it_works_and_a_cached_one_says_nothing(tmp_path):
    """The first use prints a line before building and one with the seconds when it is done
    (bnscope info and a first run show them); a build found in the cache prints nothing. A
    stand-in compiler that 'builds' at once (an empty file, which then fails to load) keeps
    this fast."""
    fake = tmp_path / "quick-c++"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = {"CXX": str(fake), "BNCORE_CACHE_DIR": str(tmp_path / "cache")}
    first = _run_isolated(CHECK_AGAINST_TORCH, **env)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    start = lines.index(cpu.building_message())
    done = next(i for i, ln in enumerate(lines) if "built the fused CPU batch-norm kernel in" in ln)
    assert start < done and str(tmp_path / "cache") in lines[done]
    again = _run_isolated(CHECK_AGAINST_TORCH, **env)
    assert again.returncode == 0, again.stderr
    assert "batch-norm kernel" not in again.stderr  # cached: not a word of building


def test_build_messages():
    assert cpu.building_message() == (
        "bnscope: building the fused CPU batch-norm kernel (first use on this machine; "
        "usually about a minute)…"
    )
    done = cpu.built_message(48.4, Path("/cache/bncore/bn_cpu-1.so"))
    assert done.startswith("bnscope: built the fused CPU batch-norm kernel in 48 s")
    assert "/cache/bncore" in done
    assert "did not build (3 s)" in cpu.built_message(3.2, None)


def test_build_is_cached_and_shared(tmp_path, fused):
    """Two processes that need the kernel at once on a fresh machine (a sweep's workers): one
    builds it, the other waits and loads the same file; a third finds it built."""
    code = "from bncore.nn.kernels import cpu; assert cpu.available(); print('ok')"
    env = {**os.environ, "BNCORE_CACHE_DIR": str(tmp_path)}
    both = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in both]
    assert [out.strip() for out, _ in outs] == ["ok", "ok"], [err for _, err in outs]
    builds = sum(err.count(cpu.building_message()) for _, err in outs)
    assert builds == 1, [err for _, err in outs]
    again = _run_isolated(code, BNCORE_CACHE_DIR=str(tmp_path))
    assert again.stdout.strip() == "ok" and "batch-norm kernel" not in again.stderr
    built = list(tmp_path.glob("bn_cpu-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_compiled_kernel_matches_reference_on_cpu():
    """torch.compile of the reference (the CUDA path) checked here on the CPU."""
    compiled = pytest.importorskip("bncore.nn.kernels.compiled")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, 6, generator=gen)
    w, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    dy = torch.randn(16, 8, 6, generator=gen)
    fast, ref = compiled.forward(x, w, b, 1e-5), reference.forward(x, w, b, 1e-5)
    if not compiled.available():
        pytest.skip(f"torch.compile unavailable here: {compiled.unavailable_reason()}")
    for name in fast._fields:
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-4, atol=1e-4)
    g_fast = compiled.backward(dy, x, fast.mean, fast.invstd, w)
    g_ref = reference.backward(dy, x, ref.mean, ref.invstd, w)
    for name in g_fast._fields:
        torch.testing.assert_close(
            getattr(g_fast, name), getattr(g_ref, name), rtol=1e-4, atol=1e-3
        )

"""The fused CPU kernel (bn_cpu.cpp), built on first use with the system's C++ compiler.

The shared library is cached per source, compiler and CPU (it is built with -march=native), in
``$BNCORE_CACHE_DIR`` or ``~/.cache/bncore``. Where no compiler is found, or the build fails,
:func:`available` is False and the caller falls back to the reference kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from bncore.kernels.reference import (
    Backward,
    Forward,
    Running,
    update_running,
)

log = logging.getLogger(__name__)

NAME = "cpu"
SOURCE = Path(__file__).with_name("bn_cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] | None = None
_failed: str | None = None


def cache_dirs() -> list[Path]:
    """Where built kernels may be kept, in order of preference."""
    env = os.environ.get("BNCORE_CACHE_DIR")
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bncore"
    return [Path(env)] if env else [home, Path(tempfile.gettempdir()) / "bncore"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def _build(cxx: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *FLAGS, _cpu_fingerprint()]).encode()).hexdigest()
    name = f"bn_cpu-{key[:16]}.so"
    for folder in cache_dirs():
        if (folder / name).exists():
            return folder / name
    for folder in cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError:
            continue
        os.close(fd)
        # Build beside the target and rename: concurrent workers never load a half-built file.
        try:
            subprocess.run(
                [cxx, *FLAGS, str(SOURCE), "-o", tmp],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return folder / name
    raise RuntimeError(f"no writable cache directory among {[str(d) for d in cache_dirs()]}")


def _bind(lib: ctypes.CDLL) -> dict[tuple[str, torch.dtype], ctypes._CFuncPtr]:
    """The library's entry points by ('forward' | 'backward', dtype)."""
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    signatures = {
        "forward": [p, p, i64, i64, i64, i32, p, p, f64, p, p, p, f64, f64, i32],
        "backward": [p, p, p, i64, i64, i64, i32, p, p, p, p, i32],
    }
    fns = {}
    for kind, argtypes in signatures.items():
        for dtype, sfx in _SUFFIX.items():
            fn = getattr(lib, f"bn_{kind}_{sfx}")
            fn.argtypes, fn.restype = argtypes, None
            fns[kind, dtype] = fn
    return fns


def load() -> dict[tuple[str, torch.dtype], ctypes._CFuncPtr] | None:
    """The library's functions, building it on first call; None (warned once) if it can't be."""
    global _fns, _failed
    if _fns is not None or _failed is not None:
        return _fns
    with _lock:
        if _fns is not None or _failed is not None:
            return _fns
        cxx = _compiler()
        try:
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
            _fns = _bind(ctypes.CDLL(str(_build(cxx))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            _failed = detail.strip().splitlines()[-1] if detail.strip() else type(exc).__name__
            log.warning("bncore: fused CPU kernel unavailable, using the reference (%s)", _failed)
    return _fns


def available() -> bool:
    """True if the library is built (or can be) on this machine."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, once it has been tried."""
    return _failed


def layout(x: Tensor) -> str | None:
    """'planes' for contiguous (N, C, L>1) data; 'rows' where the channel is the innermost
    dimension ((N, C) matrices, channels-last images); None for any other layout."""
    if x.is_contiguous():
        return "planes" if x.dim() > 2 and x.numel() > x.shape[0] * x.shape[1] else "rows"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "rows"
    size, stride = x.shape, x.stride()
    expected = 1  # channels-last order: C innermost, then the trailing dims, then N
    for d in (1, *range(x.dim() - 1, 1, -1), 0):
        if size[d] != 1 and stride[d] != expected:
            return None
        expected *= size[d]
    return "rows"


def supports(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether this kernel handles the input: float32/float64 on the CPU, params of its dtype."""
    if x.dtype not in _SUFFIX or x.device.type != "cpu" or layout(x) is None:
        return False
    return (weight is None or (weight.dtype == x.dtype and weight.is_contiguous())) and (
        bias is None or (bias.dtype == x.dtype and bias.is_contiguous())
    )


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _require() -> dict[tuple[str, torch.dtype], ctypes._CFuncPtr]:
    fns = load()
    if fns is None:
        raise RuntimeError(f"the fused CPU kernel is unavailable: {_failed}")
    return fns


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: Running | None = None,
) -> Forward:
    """Fused training-mode forward; see reference.forward."""
    fn = _require()["forward", x.dtype]
    n, c = x.shape[0], x.shape[1]
    m = x.numel() // c
    y = torch.empty_like(x)
    stats = torch.empty((3, c), dtype=x.dtype)
    rm = rv = None
    momentum, correction = 0.0, 1.0
    # The kernel updates the running buffers itself where it can; else the reference does.
    fused = (
        running is not None
        and not isinstance(running.momentum, Tensor)
        and running.mean.dtype == x.dtype
        and running.var.dtype == x.dtype
        and running.mean.is_contiguous()
        and running.var.is_contiguous()
    )
    if fused:
        assert running is not None
        rm, rv, momentum = running.mean.data_ptr(), running.var.data_ptr(), running.momentum
        correction = m / (m - 1) if running.unbiased else 1.0
    fn(
        x.data_ptr(),
        y.data_ptr(),
        n,
        c,
        m // n,
        layout(x) == "rows",
        _ptr(weight),
        _ptr(bias),
        eps,
        stats.data_ptr(),
        rm,
        rv,
        momentum,
        correction,
        torch.get_num_threads(),
    )
    mean, var, invstd = stats.unbind(0)
    if running is not None and not fused:
        update_running(running, mean, var, m)
    return Forward(y, mean, var, invstd)


def backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
) -> Backward:
    """Fused closed-form backward; see reference.backward."""
    fn = _require()["backward", x.dtype]
    rows = layout(x) == "rows"
    if dy.stride() != x.stride() or dy.dtype != x.dtype:
        dy = torch.empty_like(x).copy_(dy)
    n, c = x.shape[0], x.shape[1]
    dx = torch.empty_like(x) if need_dx else None
    sums = torch.empty((4, c), dtype=x.dtype)
    fn(
        dy.data_ptr(),
        x.data_ptr(),
        _ptr(dx),
        n,
        c,
        x.numel() // (n * c),
        rows,
        mean.data_ptr(),
        invstd.data_ptr(),
        _ptr(weight),
        sums.data_ptr(),
        torch.get_num_threads(),
    )
    sum_dy_xhat, sum_dy, dy_sq, dx_sq = sums.unbind(0)
    return Backward(dx, sum_dy_xhat, sum_dy, dy_sq, dx_sq if need_dx else None)

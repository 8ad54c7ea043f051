"""The fused CPU kernel: bn_cpu.cpp (the batch-norm operators) and record_cpu.cpp (the
recorder's), over the math of bn_cpu.h, built on first use into torch operators (``bncore::*``).

The extension is compiled with the system's C++ compiler against the installed torch's headers,
and cached per source, compiler, torch and CPU (it is built with -march=native) in
``$BNCORE_CACHE_DIR`` or ``~/.cache/bncore``. Its ``batch_norm_train`` operator carries its own
backward in C++, so a training step runs no Python inside the layer. Where no compiler is found,
or the build fails, :func:`available` is False and the reference kernel runs instead. A build
(about a minute) says so on stderr when it starts and when it ends; a cached one says nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bncore.cache import cache_dirs
from bncore.nn.byproducts import RECORD_RUNNING, Capture
from bncore.nn.kernels import reference
from bncore.nn.kernels.reference import Backward, Forward, Running

log = logging.getLogger(__name__)

NAME = "cpu"
CPP_SOURCES = tuple(Path(__file__).with_name(f) for f in ("bn_cpu.cpp", "record_cpu.cpp"))
HEADER = Path(__file__).with_name("bn_cpu.h")
DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_loaded = False
_failed: str | None = None


def _flags() -> list[str]:
    from torch.utils import cpp_extension  # imports setuptools: only where a build may run

    torch_lib = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-O3",
        "-march=native",
        "-fopenmp",
        "-fPIC",
        "-shared",
        "-std=c++20",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{d}" for d in cpp_extension.include_paths()),
        f"-L{torch_lib}",
        "-ltorch",
        "-ltorch_cpu",
        "-lc10",
        f"-Wl,-rpath,{torch_lib}",
    ]


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


def building_message() -> str:
    """What stderr says when a build starts."""
    return (
        "bnscope: building the fused CPU batch-norm kernel (first use on this machine; "
        "usually about a minute)…"
    )


def built_message(seconds: float, path: Path | None) -> str:
    """What stderr says when a build ends: built (into ``path``) or not (None)."""
    if path is None:
        return f"bnscope: the fused CPU batch-norm kernel did not build ({seconds:.0f} s)"
    return (
        f"bnscope: built the fused CPU batch-norm kernel in {seconds:.0f} s (cached in "
        f"{path.parent}: later runs load it at once)"
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _build(cxx: str) -> Path:
    src = b"".join(f.read_bytes() for f in (HEADER, *CPP_SOURCES))
    flags = _flags()
    ident = " ".join([cxx, torch.__version__, *flags, _cpu_fingerprint()])
    key = hashlib.sha256(src + ident.encode()).hexdigest()
    name = f"bn_cpu-{key[:16]}.so"
    for folder in cache_dirs():
        if (folder / name).exists():
            return folder / name
    for folder in cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # one build per machine: the processes that start beside it wait for it
            with _build_lock(folder / f"{name}.lock"):
                if (folder / name).exists():
                    return folder / name
                return _compile(cxx, flags, folder, name)
        except OSError:  # not writable: the next folder
            continue
    raise RuntimeError(f"no writable cache directory among {[str(d) for d in cache_dirs()]}")


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Held while this process builds into ``path``'s folder: a sweep's workers starting
    together on a fresh machine compiled the kernel once each, side by side, each slower for
    the others (two at once took 36 s against 29 s alone on 2 cores). Without fcntl (Windows):
    no lock, each builds (a rename keeps a half-built file from being loaded)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(cxx: str, flags: list[str], folder: Path, name: str) -> Path:
    """The kernel built into ``folder`` as ``name``."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    _say(building_message())
    started, built = time.monotonic(), folder / name
    # Build beside the target and rename: a process never loads a half-built file.
    try:
        subprocess.run(
            [cxx, *map(str, CPP_SOURCES), "-o", tmp, *flags],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        os.replace(tmp, built)
    finally:
        _say(built_message(time.monotonic() - started, None if os.path.exists(tmp) else built))
        if os.path.exists(tmp):
            os.unlink(tmp)
    return built


def _reference_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """bncore::reference_backward: the differentiable backward the C++ op uses under
    create_graph=True; it recomputes the statistics from x so they are differentiated too."""
    mean, var = reference.batch_stats(reference.ncl_view(x))
    g = reference.backward(dy, x, mean, torch.rsqrt(var + eps), weight)
    assert g.dx is not None and g.dx_sq is not None
    return g.dx, g.sum_dy_xhat, g.sum_dy, g.dy_sq, g.dx_sq


_impls: torch.library.Library | None = None


def _first_error(text: str) -> str:
    """The line of a compiler's output that says what went wrong."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[0][:300]


def load() -> bool:
    """Build (first time) and load the operators; False (warned once) if that can't be done."""
    global _loaded, _failed, _impls
    if _loaded or _failed is not None:
        return _loaded
    with _lock:
        if _loaded or _failed is not None:
            return _loaded
        cxx = _compiler()
        try:
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
            torch.ops.load_library(str(_build(cxx)))
            _impls = torch.library.Library("bncore", "IMPL")
            _impls.impl("reference_backward", _reference_backward, "CompositeImplicitAutograd")
            _loaded = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _failed = _first_error(getattr(exc, "stderr", None) or str(exc)) or type(exc).__name__
            log.warning("bncore: fused CPU kernel unavailable, using the reference (%s)", _failed)
    return _loaded


def available() -> bool:
    """True if the operators are built (or can be) on this machine."""
    return load()


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, once it has been tried."""
    return _failed


def memory_layout(x: Tensor) -> str | None:
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
    # the cheapest checks first: this runs on every training forward
    dtype = x.dtype
    if (
        not x.is_cpu
        or dtype not in DTYPES
        or not (x.is_contiguous() or memory_layout(x) is not None)
    ):
        return False
    return (weight is None or (weight.dtype == dtype and weight.is_contiguous())) and (
        bias is None or (bias.dtype == dtype and bias.is_contiguous())
    )


def _running_args(x: Tensor, running: Running | None) -> tuple:
    """(running_mean, running_var, momentum, correction) for the operator; buffers it cannot
    update itself (another dtype, strided) are left to the caller (None here)."""
    if running is None:
        return None, None, 0.0, 1.0
    rm, rv, momentum, unbiased = running
    if not (rm.dtype == rv.dtype == x.dtype and rm.is_contiguous() and rv.is_contiguous()):
        return None, None, 0.0, 1.0
    if not isinstance(momentum, float):  # 1/k on the CPU: reading it costs no device sync
        momentum = float(momentum)
    if not unbiased:
        return rm, rv, momentum, 1.0
    m = x.numel() // x.shape[1]
    return rm, rv, momentum, m / (m - 1)


def _leftover_running(x: Tensor, running: Running | None, args: tuple, mean, var) -> None:
    if running is not None and args[0] is None:
        reference.update_running(running, mean, var, x.numel() // x.shape[1])


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: Running | None = None,
) -> Forward:
    """Fused training-mode forward (no autograd); see reference.forward."""
    _require()
    args = _running_args(x, running)
    y, mean, var, invstd = torch.ops.bncore.forward(x, weight, bias, *args, eps)
    _leftover_running(x, running, args, mean, var)
    return Forward(y, mean, var, invstd)


def backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    need_dx: bool = True,
) -> Backward:
    """Fused closed-form backward (no autograd); see reference.backward."""
    _require()
    dx, sums = torch.ops.bncore.backward(dy, x, mean, invstd, weight, need_dx)
    sum_dy_xhat, sum_dy, dy_sq, dx_sq = sums.unbind(0)
    return Backward(dx if need_dx else None, sum_dy_xhat, sum_dy, dy_sq, dx_sq if need_dx else None)


def training_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: Running | None,
    keep: Capture,
) -> Tensor:
    """Training-mode batch norm through the C++ autograd operator; records into ``keep.stats``
    and, if given, into ``keep.record`` (which must have x's dtype)."""
    stats, act, record = keep
    args = _running_args(x, running)
    kind, lo, hi = act if act is not None else (0, 0.0, 0.0)
    row = row_grad = units = None
    if record is not None:
        row, row_grad, units = record.row, record.grad, record.units
    y, mean, var, grad_stats, act_stats = _train_op()(
        x, weight, bias, *args, eps, kind, lo, hi, row, row_grad, units
    )
    _leftover_running(x, running, args, mean, var)
    if record is not None:
        grad_stats, act_stats = record.grad, record.act
        if running is not None and args[0] is None:  # moved after the operator wrote them
            c = x.shape[1]
            for i, buffer in enumerate((running.mean, running.var)):
                start = (RECORD_RUNNING + i) * c
                record.row[start : start + c].copy_(buffer)
    if stats is not None:
        stats.record(mean, var, grad_stats, act_stats if act is not None else None)
    return y


@functools.cache
def _train_op():
    """bncore::batch_norm_train's overload itself: calling it skips the packet's Python."""
    _require()
    return torch.ops.bncore.batch_norm_train.default


def _require() -> None:
    if not load():
        raise RuntimeError(f"the fused CPU kernel is unavailable: {_failed}")


class CountedGrads:
    """A count, kept in C++, of the backward passes that computed a weight's gradient."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.counter = torch.zeros(1, dtype=torch.long)
        self._count = self.counter.numpy()  # read and reset without a torch call
        self.handle = int(torch.ops.bncore.count_grads(weight, self.counter))

    def take(self) -> int:
        """The backward passes since the last take."""
        n = int(self._count[0])
        self._count[0] = 0
        return n

    def remove(self) -> None:
        torch.ops.bncore.unwatch_grad_norm(self.weight, self.handle)


def count_grads(weight: Tensor) -> CountedGrads | None:
    """A hook counting ``weight``'s gradient computations with no Python in the backward; None
    where that cannot be (not a CPU tensor, or the fused kernel unavailable)."""
    if weight.device.type != "cpu" or not available():
        return None
    return CountedGrads(weight)


def channel_moments(x: Tensor, lo: float, hi: float) -> Tensor:
    """Fused reference.channel_moments (one pass)."""
    _require()
    return torch.ops.bncore.channel_moments(x.detach(), lo, hi)


def record_row(
    out: Tensor,
    tensors: list[Tensor],
    kinds: list[int],
    lo: list[float],
    hi: list[float],
    index: list[Tensor],
    offsets: list[int],
    threads: int = 0,
) -> None:
    """Fused reference.record_row: one call, no intermediate tensors; releases the GIL."""
    torch.ops.bncore.record_row(out, tensors, kinds, lo, hi, index, offsets, threads)

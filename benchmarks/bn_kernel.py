"""bncore's BatchNorm against torch's native batch_norm: forward + backward, training mode.

Each case times torch.nn.functional.batch_norm (native: ATen on the CPU, cuDNN on CUDA) and
bncore's, side by side in one process: every repeat runs each implementation for ``--inner``
steps, in rotating order, and the ratio is taken within the repeat; the figures printed are
medians over repeats. A ratio below 1 means bncore is faster.

    python benchmarks/bn_kernel.py                 # CPU targets, plus CUDA if present
    python benchmarks/bn_kernel.py --check         # exit 1 if a target is missed
    python benchmarks/bn_kernel.py --kernels cpu reference compiled

Targets (issue #2): CPU (64,64,32,32) float32 ratio <= 1.0 (5% noise allowed, so 1.05);
CPU (256,256) <= 1.5; CUDA <= 1.1. Issue #31: a small CNN's late layers (8x8, 4x4 and 3x3
planes) on the CPU <= 1.0 too (1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bncore
from bncore.nn import kernels
from bncore.nn.functional import batch_norm


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    device: str
    target: float | None  # max ratio against native, None: informative only
    channels_last: bool = False

    @property
    def name(self) -> str:
        fmt = " channels_last" if self.channels_last else ""
        return f"{self.device} {tuple(self.shape)}{fmt}"


CASES = [
    Case((256, 256), "cpu", 1.5),
    Case((64, 64, 32, 32), "cpu", 1.05),
    Case((64, 64, 32, 32), "cpu", None, channels_last=True),
    Case((128, 64, 100), "cpu", None),
    # a small CNN's late layers: planes of 64, 16 and 9 values (bn_cpu.h's `folded`)
    Case((64, 32, 8, 8), "cpu", 1.05),
    Case((64, 32, 4, 4), "cpu", 1.05),
    Case((64, 32, 3, 3), "cpu", 1.05),
    Case((256, 256), "cuda", 1.1),
    Case((64, 64, 32, 32), "cuda", 1.1),
    Case((256, 256, 28, 28), "cuda", 1.1),
]

Step = Callable[[], object]


def make_steps(case: Case, kernel_names: list[str]) -> dict[str, Step]:
    """One closure per implementation: a training-mode forward and backward on fixed data."""
    torch.manual_seed(0)
    dev = torch.device(case.device)
    c = case.shape[1]
    x = torch.randn(case.shape, device=dev)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    w = torch.rand(c, device=dev, requires_grad=True)
    b = torch.randn(c, device=dev, requires_grad=True)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)

    def native() -> object:
        y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (x, w, b), dy)

    def ours() -> object:
        y = batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (x, w, b), dy)

    def forced(name: str) -> Step:
        def step() -> object:
            with kernels.use(name):
                return ours()

        return step

    four_d = x.dim() == 4
    layer_t = (torch.nn.BatchNorm2d if four_d else torch.nn.BatchNorm1d)(c, device=dev)
    layer_b = (bncore.BatchNorm2d if four_d else bncore.BatchNorm1d)(c, device=dev)

    def module(layer: torch.nn.Module) -> Step:
        def step() -> object:
            y = layer(x)
            return torch.autograd.grad(y, (x, *layer.parameters()), dy)

        return step

    steps: dict[str, Step] = {"native": native, "bncore": ours}
    steps.update({f"bncore[{k}]": forced(k) for k in kernel_names})
    steps["nn.BatchNorm"] = module(layer_t)
    steps["bncore.BatchNorm (records stats)"] = module(layer_b)
    return steps


def measure(
    steps: dict[str, Step], device: str, repeats: int, inner: int
) -> dict[str, list[float]]:
    """Seconds per step for each implementation, one list entry per repeat."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in steps.values():  # warm-up: builds, compiles, caches
        for _ in range(3):
            step()
    sync()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                steps[n]()
            sync()
            times[n].append((time.perf_counter() - t0) / inner)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument(
        "--budget", type=float, default=0.05, help="seconds per repeat and implementation"
    )
    ap.add_argument(
        "--kernels",
        nargs="*",
        default=[],
        choices=kernels.KERNELS,
        help="also time these kernels, forced",
    )
    ap.add_argument("--check", action="store_true", help="exit 1 if a target ratio is missed")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = ap.parse_args(argv)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"
    )
    missed = []
    for case in CASES:
        if args.device not in ("all", case.device):
            continue
        if case.device == "cuda" and not torch.cuda.is_available():
            continue
        steps = make_steps(case, args.kernels)
        for _ in range(3):
            steps["native"]()
        t0 = time.perf_counter()
        for _ in range(3):
            steps["native"]()
        one = max((time.perf_counter() - t0) / 3, 1e-6)
        inner = max(1, min(1000, int(args.budget / one)))
        times = measure(steps, case.device, args.repeats, inner)
        base = times["native"]
        print(f"\n{case.name}  (median of {args.repeats} repeats x {inner} steps)")
        print(f"  {'implementation':34s} {'time/step':>11s} {'ratio vs native':>16s}")
        for name, ts in times.items():
            ratio = statistics.median(t / n for t, n in zip(ts, base, strict=True))
            ref = "nn.BatchNorm" if name.startswith("bncore.BatchNorm") else "native"
            if ref != "native":
                ratio = statistics.median(t / n for t, n in zip(ts, times[ref], strict=True))
            note = ""
            if name == "bncore" and case.target is not None:
                ok = ratio <= case.target
                note = f"  target <= {case.target}: {'met' if ok else 'MISSED'}"
                if not ok:
                    missed.append(case.name)
            vs = "" if ref == "native" else f" (vs {ref})"
            print(f"  {name:34s} {statistics.median(ts) * 1e3:9.3f}ms {ratio:16.3f}{vs}{note}")
    sel = kernels.select(torch.zeros(2, 2), None, None).NAME
    print(f"\nkernel chosen on the CPU: {sel}")
    if missed:
        print("targets missed: " + ", ".join(missed))
    return 1 if (missed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())

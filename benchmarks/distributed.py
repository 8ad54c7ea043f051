"""Data-parallel training over 2 processes (gloo on the CPU; NCCL with 2 GPUs): the step time of
synchronized BN against per-replica BN at equal global batch, and bncore's against torch.nn's.

Every configuration trains the same CNN under DistributedDataParallel, side by side in one pair
of processes: each repeat runs every configuration for ``--inner`` steps, in rotating order,
and the ratios are taken within the repeat; the figures printed are medians over repeats.

    python benchmarks/distributed.py
    python benchmarks/distributed.py --device cuda     # needs 2 GPUs

- ``bncore sync / bncore per-replica``: what synchronizing the statistics costs (one all-gather
  per BN layer forward, one all-reduce backward).
- ``bncore sync / torch sync``: against torch.nn.SyncBatchNorm, where it runs: CUDA only (on the
  CPU torch.nn.SyncBatchNorm refuses its input), the target is <= 1.0.
- ``bncore per-replica / torch per-replica``: bncore's BatchNorm2d against torch.nn's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bncore
from bncore.nn.sync import SyncBatchNorm
from bncore.run.distributed import free_port

WORLD = 2


def _net(norm: Callable[[int], nn.Module], width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def _configs(device: str) -> dict[str, Callable[[int], nn.Module]]:
    out: dict[str, Callable[[int], nn.Module]] = {
        "bncore per-replica": bncore.BatchNorm2d,
        "bncore sync": SyncBatchNorm,
        "torch per-replica": nn.BatchNorm2d,
    }
    if device == "cuda":
        out["torch sync"] = nn.SyncBatchNorm
    return out


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    per_replica = args.batch // WORLD
    steps = {}
    for name, norm in _configs(args.device).items():
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(
            _net(norm, args.width, args.depth).to(device),
            device_ids=[rank] if args.device == "cuda" else None,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(per_replica, 3, args.size, args.size, device=device)
        y = torch.randint(0, 10, (per_replica,), device=device)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt, x=x, y=y) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    for step in steps.values():  # warm up
        for _ in range(3):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if args.device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.inner):
                steps[name]()
            if args.device == "cuda":
                torch.cuda.synchronize()
            elapsed = torch.tensor([(time.perf_counter() - t0) / args.inner])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest
            times[name].append(float(elapsed))
    if rank == 0:
        lines = [f"{n:22s} {1e3 * statistics.median(t):8.2f} ms/step" for n, t in times.items()]

        def ratio(a: str, b: str) -> str:
            if a not in times or b not in times:
                return f"{a} / {b}: n/a (not on {args.device})"
            rs = [x / y for x, y in zip(times[a], times[b], strict=True)]
            return f"{a} / {b}: {statistics.median(rs):.3f} (min {min(rs):.3f}, max {max(rs):.3f})"

        lines += [
            ratio("bncore sync", "bncore per-replica"),
            ratio("bncore sync", "torch sync"),
            ratio("bncore per-replica", "torch per-replica"),
        ]
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch", type=int, default=128, help="global batch (split over 2)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--size", type=int, default=16, help="image height and width")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10)
    args = ap.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < WORLD:
        print("--device cuda needs 2 GPUs", file=sys.stderr)
        return 2
    port = free_port()
    out = f"/tmp/bnscope-distributed-{os.getpid()}.txt"
    mp.spawn(_worker, args=(port, args, out), nprocs=WORLD, join=True)
    print(
        f"{WORLD} processes ({args.device}), global batch {args.batch}, CNN {args.depth} x "
        f"{args.width} on {args.size}x{args.size}"
    )
    with open(out) as f:
        print(f.read(), end="")
    os.unlink(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A watched model under torch.compile against the same model compiled unwatched: whether it
trains bit for bit the same (losses and state_dict), whether dynamo broke the graph or hit its
recompile limit, and the throughput ratio (compiled unwatched step time over compiled watched;
1 is free). Target (issue #31): >= 0.95, no recompile-limit warning.

Each variant compiles its own copy of the model, then trains on the same batches after
``--warmup`` steps, in alternating rounds. Inductor on a CPU compiles for minutes per model;
the test suite checks the same graphs with aot_eager (tests/bncore/record/test_watch.py).

    python benchmarks/compile_watch.py --models resnet18 mobilenet_v3_small
    python benchmarks/compile_watch.py --backend aot_eager --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from bncore.record.watcher import Watcher
from tests.third_party import torchvision_models

MODELS = ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]
TARGET = 0.95


class Loop:
    """One compiled copy of the model, its optimizer and (watched) its watcher."""

    def __init__(self, model: nn.Module, backend: str, watch: bool) -> None:
        self.model = model
        self.watcher = Watcher(model) if watch else None
        self.compiled = torch.compile(model, backend=backend)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.losses: list[float] = []
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        torch.manual_seed(seed)  # the same dropout masks in both
        start = time.perf_counter()
        loss = F.cross_entropy(self.compiled(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.watcher is not None:
            self.watcher.log(len(self.times) + 1)
        self.losses.append(loss.item())
        self.times.append(time.perf_counter() - start)


def run(arch: str, backend: str, batch: int, warmup: int, rounds: int) -> dict[str, object]:
    models = torchvision_models()
    torch.manual_seed(0)
    base = getattr(models, arch)(num_classes=10)
    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(batch, 3, 64, 64, generator=g), torch.randint(0, 10, (batch,),
             generator=g)) for _ in range(warmup + rounds)]  # fmt: skip
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = Loop(copy.deepcopy(base), backend, watch=False)
    watched = Loop(copy.deepcopy(base), backend, watch=True)
    for i, (x, y) in enumerate(data):
        for loop in (plain, watched) if i % 2 else (watched, plain):
            loop.step(x, y, seed=i)
    states = zip(plain.model.state_dict().values(), watched.model.state_dict().values(),
                 strict=True)  # fmt: skip
    exact = plain.losses == watched.losses and all(torch.equal(a, b) for a, b in states)
    counters = torch._dynamo.utils.counters
    ratio = statistics.median(plain.times[warmup:]) / statistics.median(watched.times[warmup:])
    assert watched.watcher is not None
    return {
        "model": arch, "exact": exact, "ratio": ratio,
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompile_limit": sum(v for k, v in counters["stats"].items() if "limit" in k),
        "layers": len(watched.watcher.layers),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, backend {args.backend}, batch {args.batch}, 64x64")
    print(f"{'model':<20}{'exact':>7}{'ratio':>8}{'breaks':>8}{'limit':>7}{'BN':>5}")
    ok = True
    for arch in args.models:
        r = run(arch, args.backend, args.batch, args.warmup, args.rounds)
        ok &= bool(r["exact"]) and r["ratio"] >= TARGET and not r["recompile_limit"]  # type: ignore[operator]
        print(f"{arch:<20}{r['exact']!s:>7}{r['ratio']:>8.3f}{r['graph_breaks']:>8}"
              f"{r['recompile_limit']:>7}{r['layers']:>5}", flush=True)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

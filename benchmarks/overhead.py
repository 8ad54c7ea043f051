"""What recording costs: training throughput of bncore's engine, recording every statistic of
every layer, against the same network built with torch.nn.BatchNorm and trained by a plain loop
with no instrumentation.

Both run side by side in one process, step by step: every round times one step of each variant
(flushes included, in alternating order), so all variants see the same machine moments. The
ratio is plain mean step time over the variant's, after dropping steps slower than five times
the variant's median (preemptions on a shared machine; a flush is far below that). Goals
(issue #31): >= 0.95 at statistics interval 1 (every statistic at every step), >= 1.00 at
interval 100 (bncore's BN is faster than torch's: what is left is the engine's own cost).

    python benchmarks/overhead.py
    python benchmarks/overhead.py --check      # exit 1 if a target is missed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from bncore.run.config import RunConfig
from bncore.run.engine import Trainer

CASES = {
    "MLP 6x256, batch 128 (mnist1d)": {
        "model": {"kind": "mlp", "depth": 6, "width": 256},
        "data": {"name": "mnist1d"},
        "batch_size": 128,
    },
    "CNN 4x32, batch 64 (digits 8x8)": {
        "model": {"kind": "cnn", "depth": 4, "width": 32},
        "data": {"name": "digits"},
        "batch_size": 64,
    },
}
INTERVALS = (1, 10, 100)
#: The goal at each statistics interval that has one.
TARGETS = {1: 0.95, 100: 1.00}


class PlainLoop:
    """The baseline: the same network with torch.nn.BatchNorm, no probes, no records."""

    def __init__(self, cfg: RunConfig, data) -> None:
        self.t = Trainer(cfg, dataset=data)  # same data, batches and initialization
        self.t.recorder.close()  # no gradient-norm hooks either
        for _, block in self.t.model.blocks():
            bn = block.norm
            cls = (
                nn.BatchNorm2d
                if cfg.model.kind == "cnn" and data.x_train.dim() == 4
                else (nn.BatchNorm1d)
            )
            ref = cls(block.channels, eps=bn.eps, momentum=bn.momentum)
            ref.load_state_dict(bn.state_dict())
            block.norm = ref
        self.t.optimizer = torch.optim.SGD(
            self.t.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum
        )

    def step(self) -> None:
        t = self.t
        x, y = t.next_batch()
        loss = t.loss_fn(t.model(x), y)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()


def run_case(name: str, spec: dict, rounds: int) -> list[tuple[int, float]]:
    base_cfg = RunConfig.model_validate({**spec, "steps": 100_000, "optim": {"lr": 0.01}})
    from bncore.run.data import load_dataset

    data = load_dataset(base_cfg.data)
    engines = {
        k: Trainer(base_cfg.model_copy(update={"stats_interval": k}), dataset=data)
        for k in INTERVALS
    }
    plain = PlainLoop(base_cfg, data)

    def engine_step(tr: Trainer) -> None:
        tr.step()
        if len(tr._losses) >= 50:  # the engine's own flush cadence
            tr.flush()

    variants = {
        "plain": plain.step,
        **{k: (lambda tr=tr: engine_step(tr)) for k, tr in engines.items()},
    }
    for fn in variants.values():  # warm-up: kernel build, caches
        for _ in range(20):
            fn()
    times: dict[object, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for r in range(rounds):
        for k in keys if r % 2 else keys[::-1]:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)

    def mean_step(ts: list[float]) -> float:
        limit = 5 * statistics.median(ts)
        return statistics.fmean(t for t in ts if t <= limit)

    out = []
    plain = mean_step(times["plain"])
    print(
        f"\n{name}: plain loop {plain * 1e3:.2f} ms/step (torch.nn.BatchNorm, no recording), "
        f"{rounds} rounds"
    )
    for k in INTERVALS:
        ratio = plain / mean_step(times[k])
        ms = mean_step(times[k]) * 1e3
        goal = TARGETS.get(k)
        note = f"  goal >= {goal:.2f}: {'met' if ratio >= goal else 'MISSED'}" if goal else ""
        print(f"  stats every {k:>3} steps: {ms:6.2f} ms/step, throughput ratio {ratio:.3f}{note}")
        out.append((k, ratio))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1500, help="steps of each variant")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    missed = []
    for name, spec in CASES.items():
        for k, ratio in run_case(name, spec, args.rounds):
            if k in TARGETS and ratio < TARGETS[k]:
                missed.append(f"{name} at interval {k}")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

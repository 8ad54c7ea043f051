"""What recording costs: training throughput of bncore's engine, recording every statistic of
every layer, against the same network built with torch.nn.BatchNorm and trained by a plain loop
with no instrumentation.

Both run side by side in one process: each repeat trains each variant for ``--steps`` steps, in
rotating order; the ratio (engine steps/s over plain steps/s) is taken within the repeat and the
median over repeats is printed. Target (issue #3): >= 0.90 at statistics interval 1.

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

from bncore.config import RunConfig
from bncore.engine import Trainer

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
TARGET = 0.90


class PlainLoop:
    """The baseline: the same network with torch.nn.BatchNorm, no probes, no records."""

    def __init__(self, cfg: RunConfig, data) -> None:
        self.t = Trainer(cfg, dataset=data)  # same data, batches and initialization
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


def run_case(name: str, spec: dict, repeats: int, steps: int) -> list[tuple[int, float]]:
    base_cfg = RunConfig.model_validate({**spec, "steps": 100_000, "optim": {"lr": 0.01}})
    from bncore.data import load_dataset

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
    # Each repeat interleaves the variants in short chunks, so they share the machine's moods.
    times: dict[object, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    chunk = 5
    for r in range(repeats):
        spent = dict.fromkeys(keys, 0.0)
        for c in range(max(1, steps // chunk)):
            rot = (r + c) % len(keys)
            for k in keys[rot:] + keys[:rot]:
                t0 = time.perf_counter()
                for _ in range(chunk):
                    variants[k]()
                spent[k] += time.perf_counter() - t0
        for k in keys:
            times[k].append(spent[k])
    out = []
    plain_ms = statistics.median(times["plain"]) / steps * 1e3
    print(f"\n{name}: plain loop {plain_ms:.2f} ms/step (torch.nn.BatchNorm, no recording)")
    for k in INTERVALS:
        ratio = statistics.median(p / e for p, e in zip(times["plain"], times[k], strict=True))
        ms = statistics.median(times[k]) / steps * 1e3
        note = f"  target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'}" if k == 1 else ""
        print(f"  stats every {k:>3} steps: {ms:6.2f} ms/step, throughput ratio {ratio:.3f}{note}")
        out.append((k, ratio))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=50, help="steps per repeat and variant")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    missed = []
    for name, spec in CASES.items():
        for k, ratio in run_case(name, spec, args.repeats, args.steps):
            if k == 1 and ratio < TARGET:
                missed.append(name)
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

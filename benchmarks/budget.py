"""How close bncore.run.budget's estimate of a run's peak memory is to the real thing: each config
trains for a few steps in a fresh process, whose peak RSS is compared with the estimate.

    python benchmarks/budget.py

Prints estimate / measured per config (above 1: the estimate errs on the safe side).
"""

from __future__ import annotations

import json
import subprocess
import sys

from bncore.run.budget import estimate, gigabytes
from bncore.run.config import parse_config

CONFIGS = [
    {"model": {"kind": "cnn", "width": 1100}, "data": {"name": "digits"}},
    {"model": {"kind": "cnn", "width": 256, "depth": 8}, "data": {"name": "digits"},
     "batch_size": 512},
    {"model": {"kind": "mlp", "width": 2048, "depth": 8}, "optim": {"name": "adam"}},
    {"model": {"kind": "cnn", "width": 512, "depth": 6}, "data": {"name": "mnist1d"},
     "batch_size": 1024},
    {},
]  # fmt: skip

CHILD = """
import json, resource, sys
from bncore.run.config import parse_config
from bncore.run.data import load_dataset
from bncore.run.engine import Trainer
from bncore.record.sinks import MemorySink
cfg = parse_config({**json.loads(sys.argv[1]), "steps": 4, "eval_interval": 4})
Trainer(cfg, load_dataset(cfg.data)).run(MemorySink())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    print(f"{'config':70s} {'estimate':>9s} {'measured':>9s} {'ratio':>6s}")
    for c in CONFIGS:
        est = estimate(parse_config(c))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(c)], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        peak = int(out)
        label = json.dumps(c)[:70]
        print(f"{label:70s} {gigabytes(est.memory):>9s} {gigabytes(peak):>9s} "
              f"{est.memory / peak:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

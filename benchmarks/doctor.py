"""Is the BN doctor right? Its false positives over a healthy set and its findings where a
pitfall is provoked on purpose, on BN Scope's own runs (the Launch form's presets, the
experiments' arms) and on users' models under watch() (torchvision, trained normally).

- healthy: each preset's points at quick size (a point that provokes a pitfall on purpose, a
  batch under 16 say, is expected to show it, and counted apart), each experiment's control
  arms, torchvision models trained normally for a few dozen steps: every warning or error
  there is a false positive; info findings are listed;
- provoked: each experiment arm that provokes a pitfall on purpose (Experiment.provokes):
  does the doctor name it there, and not in the control arm?

    python benchmarks/doctor.py                 # presets, provoked arms and controls, models
    python benchmarks/doctor.py --all           # every arm of every experiment (long)
    python benchmarks/doctor.py --check         # exit 1 on a false positive or a miss
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bncore.diagnose import diagnose
from bncore.run.config import get_field, parse_config
from bncore.run.engine import train
from bncore.run.sweep import grid_points, point_config
from bncore.science.experiments import EXPERIMENTS
from bncore.science.experiments.local import configs
from dashboard.form import PRESETS


def diagnosed(config: dict[str, Any]) -> tuple[dict[str, str], float]:
    """(rule -> severity, seconds) of one run of ``config``, trained here."""
    started = time.perf_counter()
    cfg = parse_config(config)
    if cfg.distributed.replicas > 1:
        from bncore.record.sinks import MemorySink
        from bncore.run.distributed import train_replicas

        sink = MemorySink()
        train_replicas(cfg, sink)
        records, meta = sink.records, sink.meta
    else:
        res = train(cfg)
        assert res.records is not None
        records, meta = res.records, res.meta
    doctor = diagnose(records, meta)
    found = {d.rule: d.severity for d in doctor.diagnoses}
    return found, time.perf_counter() - started


def expected_for(config: dict[str, Any]) -> set[str]:
    """The pitfalls a run's config makes true: a normalization batch under 16 (per replica
    unless BN is synchronized; the global batch when it is), the learning-rate sweep's top."""
    cfg = parse_config(config)
    out = set()
    bn = cfg.norm.kind in ("batch", "ghost", "renorm", "noisy")
    replicas = cfg.distributed.replicas
    n = cfg.batch_size if cfg.distributed.sync_bn or replicas == 1 else cfg.batch_size // replicas
    if cfg.norm.kind == "ghost":
        n = min(n, cfg.norm.resolved_virtual_batch(cfg.batch_size))
    if bn and n < 16:
        out.add("small-batch")
    if bn and cfg.optim.lr >= 3.0:  # the learning-rate sweep's top: the run is at chance
        out.add("dead-channels")
    return out


def allowed_for(expected: set[str]) -> set[str]:
    """What a run may show beside what it is expected to: the train/eval gap that a small
    batch's noisy statistics open (the gap is measured, so true where it is found)."""
    return {"train-eval-gap"} if "small-batch" in expected else set()


def presets(steps: int) -> list[tuple[str, dict[str, Any], set[str]]]:
    runs = []
    for name, preset in PRESETS.items():
        for point in grid_points(preset["grid"]):
            config = point_config({**preset["base"], "steps": steps}, point)
            label = ", ".join(f"{k}={v}" for k, v in point.items())
            runs.append((f"preset {name}: {label}", config, expected_for(config)))
    return runs


def experiments(every_arm: bool) -> tuple[list, list]:
    """(healthy: control and unprovoked arms, provoked: (label, config, rule, control?))"""
    healthy, provoked = [], []
    for exp in EXPERIMENTS.values():
        # one seed: the verdicts' other seeds repeat the same arms (the doctor reads configs)
        arms = [cfg for cfg in configs(exp) if cfg.get("seed", 0) == 0]
        marked: dict[int, set[str]] = {}
        controls: set[int] = set()
        for pro in exp.provokes:
            for i, cfg in enumerate(arms):
                at = {k: get_field(cfg, k) for k in pro.where}
                ctl = {k: get_field(cfg, k) for k in pro.control}
                if at == pro.where:
                    marked.setdefault(i, set()).add(pro.rule)
                if ctl == pro.control:
                    controls.add(i)
        for i, cfg in enumerate(arms):
            label = f"{exp.key}: " + ", ".join(f"{k}={get_field(cfg, k)}" for k in exp.grid)
            if i in marked:
                provoked.append((label, cfg, marked[i]))
            elif i in controls or every_arm:
                healthy.append((label, cfg, expected_for(cfg)))
    return healthy, provoked


def models(steps: int) -> list[tuple[str, dict[str, str]]]:
    """torchvision models trained normally under watch(), diagnosed offline."""
    import importlib.util

    import torch

    if importlib.util.find_spec("torchvision") is None:
        print("  (torchvision not installed: no users' models)")
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CPU shim
    from bncore.record.tables import Records
    from bncore.record.watcher import Watcher
    from tests.third_party import torchvision_models

    zoo = torchvision_models()
    out = []
    for name in ("resnet18", "mobilenet_v3_small", "densenet121"):
        torch.manual_seed(0)
        model, shape = getattr(zoo, name)(num_classes=10), (3, 32, 32)
        watcher = Watcher(model, channel_interval=5, measure_interval=5)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        parts, losses = [], []
        for step in range(1, steps + 1):
            x, y = torch.randn(16, *shape), torch.randint(0, 10, (16,))
            loss = torch.nn.functional.cross_entropy(model(x)[:, :10], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            watcher.log(step)
            losses.append(float(loss))
            if step % 10 == 0:
                parts.append(watcher.flush())
        rec = Records.concat(parts)
        rec.steps = {"step": np.arange(1, steps + 1), "loss": np.asarray(losses),
                     "lr": np.full(steps, 0.01)}  # fmt: skip
        found = {d.rule: d.severity for d in diagnose(rec, watcher.meta()).diagnoses}
        watcher.close()
        out.append((f"torchvision {name}", found))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every arm of every experiment")
    parser.add_argument("--steps", type=int, default=300, help="steps of each preset point")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    false_positives, misses, infos = 0, 0, Counter()
    healthy = presets(args.steps)
    exp_healthy, provoked = experiments(args.all)
    print(f"{'run':78} {'found (warning/error)':40} {'s':>5}")
    for label, config, expected in healthy + exp_healthy:
        found, seconds = diagnosed(config)
        bad = {r for r, s in found.items() if s != "info"} - expected - allowed_for(expected)
        missed = expected - set(found)
        false_positives += len(bad)
        misses += len(missed)
        infos.update(r for r, s in found.items() if s == "info")
        mark = "FALSE POSITIVE " + ",".join(sorted(bad)) if bad else ""
        mark += (" MISSED " + ",".join(sorted(missed))) if missed else ""
        shown = ",".join(sorted(r for r, s in found.items() if s != "info")) or "-"
        print(f"{label[:78]:78} {shown[:40]:40} {seconds:5.0f} {mark}", flush=True)
    for label, config, rules in provoked:
        found, seconds = diagnosed(config)
        missed = rules - set(found)
        misses += len(missed)
        shown = ",".join(sorted(r for r, s in found.items() if s != "info")) or "-"
        verdict = "MISSED " + ",".join(sorted(missed)) if missed else "found " + ",".join(rules)
        print(f"{label[:78]:78} {shown[:40]:40} {seconds:5.0f} provoked: {verdict}", flush=True)
    for label, found in models(40):
        bad = {r for r, s in found.items() if s != "info"}
        false_positives += len(bad)
        infos.update(r for r, s in found.items() if s == "info")
        print(f"{label:78} {','.join(sorted(bad)) or '-':40} {'':>5} "
              f"{'FALSE POSITIVE' if bad else ''}")  # fmt: skip
    print(f"\nfalse positives (warnings/errors on healthy runs): {false_positives}")
    print(f"provoked pitfalls missed: {misses}")
    print(f"info findings on healthy runs: {dict(infos)}")
    return 1 if args.check and (false_positives or misses) else 0


if __name__ == "__main__":
    sys.exit(main())

"""What watching a user's model costs: training throughput of a plain loop with
``bnscope.client``'s watch() recording every BN layer at every step, against the same loop
unwatched; beside it, the same loop under ``wandb.watch(log="all", log_freq=1)`` (offline) and
under TensorBoard histograms of every BN's batch mean and variance from forward hooks, where
those packages are installed (benchmark-only: never the project's dependencies).

Each variant trains its own copy of the same model on the same batches, side by side with a
plain loop of its own in one process (a phase per variant: wandb and TensorBoard write from
background threads and processes, which would land in their neighbours' timings): each round
times one step of each, in alternating order. The watched loop runs the client's own code
(bnscope.client.ClientRun with its defaults: every step logged with what BN computed anyway;
per-channel arrays, and what costs an extra pass, every 20 logged steps; a flush every 2 s or
100 steps, encoded on a thread of its own as it would be sent) with the network left out; a
second variant takes everything at every step. The ratio is the plain loop's mean step time
over the variant's, after dropping steps slower than five times the variant's median
(preemptions). Goals (issue #31): watch() with its defaults >= 0.98 on ResNet-18 (batch 32,
CPU) and >= 0.95 on the 6 x 256 MLP (batch 128); everything at every step >= 0.90 on ResNet-18.

    python benchmarks/watch_overhead.py
    python benchmarks/watch_overhead.py --rounds 100 --check
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # tests/

from bncore.record import watcher as watch_module
from bncore.record.sinks import encode
from bncore.record.tables import Records
from bnscope.client import Client, ClientRun

#: Each case's goals, by variant.
WATCH, EVERYTHING = "bnscope watch", "bnscope watch, all at every step"
TARGETS = {"resnet18": {WATCH: 0.98, EVERYTHING: 0.90}, "mlp": {WATCH: 0.95}}


class EncodingSink:
    """Where the client's batches go here: built and encoded exactly as for the server, on a
    thread of their own as bnscope.client's HttpSink does, but sent nowhere."""

    def __init__(self) -> None:
        self.bytes = 0
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (records := self.queue.get()) is not None:
            self.bytes += len(encode(records, 1))

    def update_meta(self, meta: dict[str, Any]) -> None:
        pass

    def write(self, records: Records) -> None:
        self.queue.put(records)

    def finish(self, summary: dict[str, Any]) -> None:
        self.queue.put(None)
        self.thread.join()


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    width_in = 40
    for _ in range(6):
        layers += [nn.Linear(width_in, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU()]
        width_in = 256
    return nn.Sequential(*layers, nn.Linear(256, 10))


def resnet18() -> nn.Module | None:
    try:
        from tests.third_party import _tolerate_missing_torchvision_ops

        with _tolerate_missing_torchvision_ops():
            import torchvision.models as models
    except ImportError:
        return None
    return models.resnet18(num_classes=10)


@contextlib.contextmanager
def torch_batch_norm() -> Iterator[None]:
    """Unwatched variants call torch's F.batch_norm itself, not the watcher's wrapper."""
    patched = torch.nn.functional.batch_norm
    torch.nn.functional.batch_norm = watch_module._ORIGINAL
    try:
        yield
    finally:
        torch.nn.functional.batch_norm = patched


class Loop:
    """One copy of the model, its optimizer and the batches; ``step`` trains one."""

    def __init__(self, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model, self.data, self.i = model, data, 0
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.after: Callable[[int, torch.Tensor], None] | None = None
        self.unwatched = True

    def step(self) -> None:
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        ctx = torch_batch_norm() if self.unwatched else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.after is not None:
                self.after(self.i, loss)


def optional(module: str, package: str | None = None) -> Any:
    """``module`` imported, or None (saying so) where its package is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        print(f"  ({package or module} not installed: its row is left out)")
        return None


def phases(model: nn.Module, data) -> Iterator[tuple[dict[str, Loop], list[Callable[[], None]]]]:
    """Pairs of loops timed together: a plain loop and one instrumented variant."""
    closers: list[Callable[[], None]]

    def pair() -> tuple[dict[str, Loop], Loop]:
        """The plain loop, and a copy of it for a variant to instrument."""
        return {"plain": Loop(copy.deepcopy(model), data)}, Loop(copy.deepcopy(model), data)

    everything = {"channel_interval": 1, "measure_interval": 1}
    for label, every in ((WATCH, {}), (EVERYTHING, everything)):
        (loops, watched), closers = pair(), []
        run = ClientRun(Client("http://127.0.0.1:9"), "bench", heartbeat=None, **every)
        run.sink.abandon()
        run.sink = EncodingSink()  # type: ignore[assignment]
        run.watch(watched.model)
        watched.after, watched.unwatched = run.log, False
        loops[label] = watched
        closers += [run.unwatch, lambda run=run: run.sink.finish({})]
        yield loops, closers

    wandb = optional("wandb")
    if wandb is not None:
        (loops, loop), closers = pair(), []
        wrun = wandb.init(mode="offline", dir=tempfile.mkdtemp(), project="bench", reinit=True)
        wandb.watch(loop.model, log="all", log_freq=1)
        loop.after = lambda step, loss: wrun.log({"loss": loss.item()}, step=step)
        loops["wandb.watch(log='all', log_freq=1)"] = loop
        closers.append(wrun.finish)
        yield loops, closers

    tensorboard = optional("torch.utils.tensorboard", "tensorboard")
    if tensorboard is not None:
        (loops, loop), closers = pair(), []
        writer = tensorboard.SummaryWriter(tempfile.mkdtemp())
        for name, m in loop.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):

                def hook(mod, args, out, name=name, loop=loop):
                    x = args[0].detach()
                    dims = [d for d in range(x.dim()) if d != 1]
                    var, mean = torch.var_mean(x, dims, correction=0)
                    writer.add_histogram(f"{name}/mean", mean, loop.i)
                    writer.add_histogram(f"{name}/var", var, loop.i)

                m.register_forward_hook(hook)
        loops["TensorBoard BN histograms (hooks)"] = loop
        closers.append(writer.close)
        yield loops, closers


def run_case(name: str, model: nn.Module, batch: int, shape: tuple[int, ...], rounds: int):
    torch.manual_seed(0)
    data = [(torch.randn(batch, *shape), torch.randint(0, 10, (batch,))) for _ in range(16)]

    def mean_step(ts: list[float]) -> float:
        limit = 5 * statistics.median(ts)
        return statistics.fmean(t for t in ts if t <= limit)

    print(f"\n{name}, {rounds} rounds")
    ratios = {}
    for loops, closers in phases(model, data):
        for loop in loops.values():  # warm-up
            for _ in range(10):
                loop.step()
        times: dict[str, list[float]] = {k: [] for k in loops}
        keys = list(loops)
        for r in range(rounds):
            for k in keys if r % 2 else keys[::-1]:
                t0 = time.perf_counter()
                loops[k].step()
                times[k].append(time.perf_counter() - t0)
        for close in closers:
            close()
        plain = mean_step(times["plain"])
        print(f"  {'plain loop (its phase)':<36} {plain * 1e3:8.2f} ms/step")
        for k in keys[1:]:
            ratio = ratios[k] = plain / mean_step(times[k])
            print(f"  {k:<36} {mean_step(times[k]) * 1e3:8.2f} ms/step  throughput ratio "
                  f"{ratio:.3f}  ({1 / ratio:.2f}x plain's step time)")  # fmt: skip
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=0, help="steps of each variant (0: per case)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    missed = []
    cases = [("mlp", "MLP 6 x 256, batch 128", mlp(), 128, (40,), args.rounds or 1000)]
    net = resnet18()
    if net is None:
        print("torchvision is not installed: the ResNet-18 case is left out")
    else:
        cases.insert(0, ("resnet18", "ResNet-18, batch 32, 3x32x32", net, 32, (3, 32, 32),
                         args.rounds or 300))  # fmt: skip
    for key, name, model, batch, shape, rounds in cases:
        ratios = run_case(name, model, batch, shape, rounds)
        for variant, goal in TARGETS[key].items():
            verdict = "met" if ratios[variant] >= goal else "MISSED"
            print(f"  goal, {variant}: >= {goal:.2f}: {verdict} ({ratios[variant]:.3f})")
            if ratios[variant] < goal:
                missed.append(f"{name}, {variant}")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

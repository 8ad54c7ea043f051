"""The training loop: a RunConfig in, records out, every layer's BN statistics at every step.

    from bncore import RunConfig, train
    result = train(RunConfig(steps=500))          # in memory
    result.records.layers["pre_var"]              # numpy columns (see bncore.record.tables)

A run ends "completed", "diverged" (the loss became NaN or infinite: it stops at the flush that
sees it, keeping everything recorded up to then), or "cancelled" (``should_stop`` returned True).
Statistics stay on the device and reach the host once per flush (every ``flush_every`` steps or
``flush_seconds``), never by a per-layer ``.item()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bncore.nn.norms import noisy_norms
from bncore.nn.sync import convert_sync_batchnorm
from bncore.record.probe import mode_gap_probe
from bncore.record.recorder import Recorder
from bncore.record.sinks import MemorySink, Sink
from bncore.record.tables import Records
from bncore.run.config import RunConfig
from bncore.run.data import Dataset, load_dataset
from bncore.run.landscape import internal_covariate_shift, landscape, preserved
from bncore.run.models import Net, build_model
from bncore.run.population import (
    ema_gaps,
    population_statistics,
    running_buffers,
    set_running,
    tracked_norms,
)
from bncore.run.propagation import signal_propagation
from bncore.run.replicas import Replicas
from bncore.status import RunStatus
from bncore.version import __version__

__all__ = ["RunResult", "Trainer", "resolve_device", "train"]

EVAL_BATCH = 2048
#: Step sizes of the landscape measurement, in learning rates (Santurkar et al. use a range).
LANDSCAPE_STEPS = (0.5, 1.0, 2.0, 4.0)
TRAIN_EVAL_EXAMPLES = 2000


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but no CUDA device is available here")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class RunResult:
    """How a run ended, and (with the default in-memory sink) what it recorded."""

    status: str  # a RunStatus value: completed | diverged | cancelled
    steps_done: int
    message: str = ""
    seconds: float = 0.0
    final: dict[str, float] = field(default_factory=dict)
    records: Records | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # what the run is (Trainer.meta)


class Trainer:
    """Owns the data, model, optimizer and recorder of one run; :meth:`run` drives it."""

    def __init__(
        self,
        config: RunConfig,
        dataset: Dataset | None = None,
        replicas: Replicas | None = None,
        device: torch.device | None = None,
    ) -> None:
        """``replicas``: this trainer's place in a distributed run (bncore.run.distributed, which
        also picks each replica's ``device``); None: it trains alone."""
        self.config = config
        self.device = device if device is not None else resolve_device(config.device)
        torch.manual_seed(config.seed)
        data = dataset if dataset is not None else load_dataset(config.data)
        self.data = data.to(self.device)
        model = build_model(config, data.input_shape, data.num_classes)
        if replicas is not None and config.distributed.sync_bn:
            convert_sync_batchnorm(model)  # in place: a Net's blocks are modules of its own
        self.model: Net = model.to(self.device)
        self.model.train()
        self.replicas = replicas
        self.norms = tracked_norms(self.model.blocks())  # those with running statistics
        # found once: not a walk over every module at every step (16 us on a 6-block MLP)
        self._noisy = noisy_norms(self.model)
        # what the training forward goes through: DistributedDataParallel across replicas
        self.net: nn.Module = (
            replicas.wrap(self.model, self.norms, self.device) if replicas else self.model
        )
        self.optimizer = _optimizer(config, self.model)
        o = config.optim  # the schedule: lr_factor of the step about to be taken
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda taken: o.lr_factor(taken + 1, config.steps)
        )
        self.loss_fn = nn.CrossEntropyLoss()
        batch = min(len(self.data.x_train), config.batch_size)
        if replicas is not None:
            batch //= replicas.world  # each replica's share
        self.recorder = Recorder(
            self.model, config.tracked_units, self.device, batch, config.channel_interval
        )
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self.step_count = 0
        self._losses: list[Tensor] = []
        self._step_rows: dict[str, list[float]] = {
            "step": [],
            "lr": [],
            "step_time": [],
            "time": [],
        }
        n = min(len(self.data.x_train), config.batch_size)
        self.probe_batch = self.data.x_train[:n]
        self.probe_labels = self.data.y_train[:n]
        self._ics: dict[int, tuple[Tensor, Tensor]] = {}  # step -> (ICS, cosine) per block
        # PreciseBN's batches: drawn apart from the training order, which they leave alone
        self._precise_generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
        self._layer_evals: list[tuple[int, dict[str, dict[str, float]]]] = []
        self._last_eval: dict[str, float] = {}
        self.frozen = False  # FrozenBN from norm.freeze_after on

    # -- batches ------------------------------------------------------------------------------

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next training batch: a seeded permutation per epoch, dropping the short tail."""
        n, bs = len(self.data.x_train), self.config.batch_size
        bs = min(bs, n)
        if self._cursor + bs > len(self._order):
            self._order = torch.randperm(n, generator=self.generator)
            self._cursor = 0
        idx = self._order[self._cursor : self._cursor + bs].to(self.device)
        self._cursor += bs
        return self.data.x_train[idx], self.data.y_train[idx]

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> None:
        """One training step; records this step's statistics if it is due."""
        cfg = self.config
        t0 = time.perf_counter()
        self.step_count += 1
        freeze = cfg.norm.freeze_after
        if freeze is not None and not self.frozen and self.step_count > freeze * cfg.steps:
            self.freeze()
        record = (self.step_count - 1) % cfg.stats_interval == 0 and not self.frozen
        x, y = self.next_batch()
        if self.replicas is not None:
            x, y = self.replicas.shard(x, y)
        for norm in self._noisy:  # noisy BN: this step's noise, the same for every pass over x
            norm.new_step()
        self.recorder.arm(record)
        loss = self.loss_fn(self.net(x), y)
        if record and self.replicas is not None:
            self.replicas.recorded(self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = self.optimizer.param_groups[0]["lr"]  # this step's
        if record:
            self.recorder.snapshot(self.step_count, lr)
        if cfg.ics_interval and (self.step_count - 1) % cfg.ics_interval == 0:
            self.recorder.arm(False)
            blocks = [b for _, b in self.model.blocks()]
            before = []
            for b in blocks:
                grad = b.layer.weight.grad
                assert grad is not None  # the backward above reached every block's weight
                before.append(grad.detach().clone())
            self._ics[self.step_count] = internal_covariate_shift(
                self.model, self.loss_fn, x, y, blocks, before, self.optimizer.step
            )
        else:
            self.optimizer.step()
        if record:
            self.recorder.updated()
        self._losses.append(loss.detach())
        self._step_rows["step"].append(self.step_count)
        self._step_rows["lr"].append(lr)
        self.schedule.step()
        self._step_rows["step_time"].append(time.perf_counter() - t0)
        self._step_rows["time"].append(time.time())

    def freeze(self) -> None:
        """FrozenBN from now on: the population statistics (PreciseBN's where the run
        recomputes them, else the running ones) normalize in training too, fixed."""
        self.recorder.arm(False)
        if self.config.precise_bn and self.norms:
            set_running(
                self.norms, population_statistics(self.model, self.norms, self._precise_batches())
            )
        for norm in self.norms.values():
            norm.frozen = True  # type: ignore[assignment]  # kind 'batch': bncore's BatchNorm
        self.frozen = True

    def flush(self) -> Records:
        """Pending records to the host: one transfer for the losses, one for the statistics."""
        rec = self.recorder.flush(self.config.channel_interval)
        if self.config.ics_interval and rec.layers:
            self._add_ics(rec.layers)
        if self.replicas is not None:  # every replica takes part in these collectives
            self.replicas.add_columns(rec.layers)
        if self._losses:
            losses = torch.stack(self._losses)
            if self.replicas is not None:
                losses = self.replicas.mean_loss(losses)  # the global batch's
            rec.steps = {
                "step": np.asarray(self._step_rows["step"], dtype=np.int64),
                "loss": losses.float().cpu().numpy(),
                "lr": np.asarray(self._step_rows["lr"], dtype=np.float32),
                "step_time": np.asarray(self._step_rows["step_time"], dtype=np.float32),
                "time": np.asarray(self._step_rows["time"], dtype=np.float64),
            }
            self._losses = []
            self._step_rows = {k: [] for k in self._step_rows}
        rec.layer_evals = self._layer_eval_table()
        return rec

    def _layer_eval_table(self) -> dict[str, np.ndarray]:
        """The pending per-block evaluation rows as a ``layer_evals`` table (NaN where a block
        has no value of a statistic)."""
        rows = [(step, layer, vals) for step, by in self._layer_evals for layer, vals in by.items()]
        self._layer_evals = []
        if not rows:
            return {}
        stats = list(dict.fromkeys(k for _, _, vals in rows for k in vals))
        table = {
            "step": np.asarray([r[0] for r in rows], np.int64),
            "layer": np.asarray([r[1] for r in rows]),
        }
        for k in stats:
            table[k] = np.asarray([r[2].get(k, math.nan) for r in rows], np.float32)
        return table

    def _add_ics(self, layers: dict[str, np.ndarray]) -> None:
        """ICS columns for the flushed ``layers`` rows (NaN on steps without a measurement)."""
        n = len(layers["step"])
        dist, cos = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        index = {name: i for i, (name, _) in enumerate(self.model.blocks())}
        for step, (d, c) in self._ics.items():
            rows = np.nonzero(layers["step"] == step)[0]
            blocks = [index[str(name)] for name in layers["layer"][rows]]
            dist[rows], cos[rows] = d.cpu().numpy()[blocks], c.cpu().numpy()[blocks]
        layers["ics"], layers["ics_cos"] = dist, cos
        self._ics = {}

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def _loss_acc(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        total, correct = 0.0, 0
        for i in range(0, len(x), EVAL_BATCH):
            logits = self.model(x[i : i + EVAL_BATCH])
            total += float(self.loss_fn(logits, y[i : i + EVAL_BATCH])) * len(logits)
            correct += int((logits.argmax(1) == y[i : i + EVAL_BATCH]).sum())
        return total / len(x), correct / len(x)

    def _mode_gap(self, rows: dict[str, dict[str, float]]) -> float:
        """Relative distance of the probe batch's logits in train mode (batch statistics) and
        eval mode (running statistics), leaving no trace on the buffers (bncore.record.probe);
        with ``eval_gaps``, each block's eval-mode input against its running statistics, into
        ``rows``. The random state is not put back: a noisy BN's first evaluation has drawn
        its noise here since the first runs, and runs repeat as they were."""
        norms = self.norms if self.config.eval_gaps else {}
        found = mode_gap_probe(self.model, self.probe_batch, norms, keep_rng=False)
        for name, (mean_gap, var_gap) in found.layers.items():
            rows.setdefault(name, {}).update(eval_mean_gap=mean_gap, eval_var_gap=var_gap)
        return found.mode_gap

    def _precise_batches(self) -> list[Tensor]:
        """``precise_bn`` random training batches of ``batch_size``."""
        n, bs = len(self.data.x_train), min(self.config.batch_size, len(self.data.x_train))
        out = []
        for _ in range(self.config.precise_bn):
            idx = torch.randperm(n, generator=self._precise_generator)[:bs]
            out.append(self.data.x_train[idx.to(self.device)])
        return out

    @torch.no_grad()
    def _batch_mode_acc(self) -> float:
        """Test accuracy in training mode, each batch of ``batch_size`` test examples
        normalized with its own statistics (a tail too short for that left out)."""
        x, y = self.data.x_test, self.data.y_test
        bs, correct, seen = self.config.batch_size, 0, 0
        with preserved(self.model):
            self.model.train()
            for i in range(0, len(x) - 1, bs):
                xb = x[i : i + bs]
                if len(xb) < 2:
                    break
                correct += int((self.model(xb).argmax(1) == y[i : i + bs]).sum())
                seen += len(xb)
        return correct / seen if seen else math.nan

    def _population(self, out: dict[str, float], rows: dict[str, dict[str, float]]) -> None:
        """PreciseBN: population statistics, their gap to the EMA ones, and the test accuracy
        with them and with batch statistics, into ``out`` and ``rows``; NaN once FrozenBN fixed
        the statistics (the columns stay, as every table's columns do through a run)."""
        if self.frozen:
            for name in self.norms:
                rows.setdefault(name, {}).update(ema_mean_gap=math.nan, ema_var_gap=math.nan)
            out.update(test_loss_precise=math.nan, test_acc_precise=math.nan)
            out["test_acc_batch"] = math.nan
            return
        stats = population_statistics(self.model, self.norms, self._precise_batches())
        for name, (mean_gap, var_gap) in ema_gaps(self.norms, stats).items():
            rows.setdefault(name, {}).update(ema_mean_gap=mean_gap, ema_var_gap=var_gap)
        with running_buffers(self.norms, stats):
            self.model.eval()
            out["test_loss_precise"], out["test_acc_precise"] = self._loss_acc(
                self.data.x_test, self.data.y_test
            )
        out["test_acc_batch"] = self._batch_mode_acc()

    def evaluate(self) -> dict[str, float]:
        """Train (a fixed subset) and test loss and accuracy in eval mode, and the mode gap;
        what the run asks to measure at evaluations besides (PreciseBN, the landscape), and a
        residual network's signal propagation."""
        self.recorder.arm(False)
        self.model.eval()
        d = self.data
        n = min(len(d.x_train), TRAIN_EVAL_EXAMPLES)
        train_loss, train_acc = self._loss_acc(d.x_train[:n], d.y_train[:n])
        test_loss, test_acc = self._loss_acc(d.x_test, d.y_test)
        rows: dict[str, dict[str, float]] = {}
        gap = self._mode_gap(rows) if len(self.probe_batch) > 1 else math.nan
        self.model.train()
        out = {
            "step": self.step_count,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "mode_gap": gap,
        }
        if self.config.landscape:
            lr = self.optimizer.param_groups[0]["lr"]
            etas = [f * lr for f in LANDSCAPE_STEPS]
            out.update(landscape(self.model, self.loss_fn, self.probe_batch, self.probe_labels,
                                 etas))  # fmt: skip
        if self.config.precise_bn and self.norms:
            self._population(out, rows)
        if len(self.probe_batch) > 1:
            last = dict(self.model.blocks())  # a residual block's values at its last unit
            for name, (sq, var, branch) in signal_propagation(self.model, self.probe_batch).items():
                unit = f"{name}.b"
                assert unit in last
                rows.setdefault(unit, {}).update(
                    signal_sq_mean=sq, signal_var=var, branch_var=branch
                )
        self.model.train()
        if rows:
            self._layer_evals.append((self.step_count, rows))
        self._last_eval = out
        return out

    # -- the whole run ------------------------------------------------------------------------

    def run(
        self,
        sink: Sink,
        should_stop: Callable[[], bool] | None = None,
        on_flush: Callable[[Trainer, Records], None] | None = None,
        flush_every: int = 50,
        flush_seconds: float = 0.5,
    ) -> RunResult:
        cfg = self.config
        started = time.perf_counter()
        sink.start(self.meta())
        status, message, final = RunStatus.COMPLETED.value, "", {}
        last_flush = time.perf_counter()
        evals: list[dict[str, float]] = [self.evaluate()]
        together = self.replicas is not None  # replicas flush and stop at the same steps

        def stopping() -> bool:
            asked = should_stop is not None and should_stop()
            return self.replicas.agree(asked) if self.replicas is not None else asked

        try:
            while self.step_count < cfg.steps:
                if not together and stopping():
                    status = RunStatus.CANCELLED.value
                    message = f"cancelled at step {self.step_count}"
                    break
                self.step()
                due_eval = self.step_count % cfg.eval_interval == 0 or self.step_count == cfg.steps
                due_flush = len(self._losses) >= flush_every or (
                    not together and time.perf_counter() - last_flush >= flush_seconds
                )
                if not (due_eval or due_flush):
                    continue
                rec = self.flush()
                last_flush = time.perf_counter()
                bad = _first_nonfinite(rec)
                if bad is None and due_eval:
                    evals.append(self.evaluate())
                rec.evals = _eval_table(evals)
                evals = []
                sink.write(rec)
                if on_flush is not None:
                    on_flush(self, rec)
                if bad is not None:
                    status = RunStatus.DIVERGED.value
                    message = f"loss became {bad[1]} at step {bad[0]}; stopped, records kept"
                    break
                if together and self.step_count < cfg.steps and stopping():
                    status = RunStatus.CANCELLED.value
                    message = f"cancelled at step {self.step_count}"
                    break
        finally:
            rec = self.flush()
            rec.evals = _eval_table(evals)
            if any(rec.tables().values()):
                sink.write(rec)
            self.recorder.close()
        if status == RunStatus.COMPLETED.value:  # the last evaluation was at the last step
            last = self._last_eval
            if last.get("step") != self.step_count:
                last = self.evaluate()
                self._layer_evals = []
            final = {k: v for k, v in last.items() if k != "step"}
        summary = {
            **self.meta(),
            "status": status,
            "message": message,
            "steps_done": self.step_count,
            "seconds": time.perf_counter() - started,
            "final": final,
        }
        sink.finish(summary)
        return RunResult(status, self.step_count, message, summary["seconds"], final)

    def meta(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "device": str(self.device),
            "replicas": self.replicas.world if self.replicas is not None else 1,
            "layers": [n for n, _ in self.model.blocks()],
            "channels": [b.channels for _, b in self.model.blocks()],
            "tracked_units": [s.units.tolist() for s in self.recorder.slots],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "bncore": __version__,
            "torch": torch.__version__,
        }


def _optimizer(cfg: RunConfig, model: Net) -> torch.optim.Optimizer:
    o = cfg.optim
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    # gamma and beta of every block's normalization: no decay (a second group, where it matters:
    # each group is another pass of the optimizer's foreach kernels, every step)
    if o.weight_decay and not o.norm_weight_decay:
        norm = {id(p) for _, b in model.blocks() for p in b.norm.parameters()}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in norm]},
            {"params": [p for p in model.parameters() if id(p) in norm], "weight_decay": 0.0},
        ]
    # foreach: one call per operation over every parameter (torch picks it only on CUDA; on the
    # CPU its per-parameter loop cost ~0.3 ms a step in a 6-block MLP); the same arithmetic
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.SGD(
        groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True
    )


def _first_nonfinite(rec: Records) -> tuple[int, str] | None:
    if not rec.steps:
        return None
    bad = ~np.isfinite(rec.steps["loss"])
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    return int(rec.steps["step"][i]), str(float(rec.steps["loss"][i]))


def _eval_table(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    if not rows:
        return {}
    keys = dict.fromkeys(k for r in rows for k in r)  # a measurement may stop (FrozenBN)
    out = {k: np.asarray([r.get(k, math.nan) for r in rows], dtype=np.float32) for k in keys}
    out["step"] = out["step"].astype(np.int64)
    return out


def train(
    config: RunConfig,
    sink: Sink | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_flush: Callable[[Trainer, Records], None] | None = None,
) -> RunResult:
    """Run ``config`` to the end; with no ``sink`` the records come back in ``result.records``.
    A distributed run (``distributed.replicas`` > 1) is
    :func:`bncore.run.distributed.train_replicas`'s.
    """
    if config.distributed.replicas > 1:
        raise ValueError(
            f"distributed.replicas={config.distributed.replicas}: train it with "
            "bncore.run.distributed.train_replicas, which starts the replicas"
        )
    memory: MemorySink | None = None
    if sink is None:
        sink = memory = MemorySink()
    result = Trainer(config).run(sink, should_stop, on_flush)
    if memory is not None:
        result.records, result.meta = memory.records, memory.meta
    return result

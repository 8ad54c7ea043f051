"""One line for PyTorch Lightning: ``Trainer(callbacks=[BNScopeCallback(name="resnet18")])``.

The callback opens a run on a BN Scope server when fitting starts (on rank 0), watches the
LightningModule (bncore.record.watcher: the module is left as it is), logs every optimizer step with
its loss and learning rate (the micro-batches of ``accumulate_grad_batches`` are averaged into the
step they belong to; under manual optimization, every batch is a step, and its loss is what the
module logged), and reports the run completed, or failed with the exception. Needs
``lightning`` (or ``pytorch_lightning``) installed.

It tells the run the trainer's optimizers (the weight decay on each BN's gamma and on the
weights feeding them), passes ``probe`` and ``probe_every`` on (the mode-gap probe, off without
a probe; see bnscope.client.ClientRun.watch: the probe calls the LightningModule itself, its
``forward``), and logs each validation's metrics as an evaluation at the trainer's global step
(:func:`bnscope.metrics.evaluation_metrics`: ``val_loss``/``val_acc`` or the like as
test_loss/test_acc where that is unambiguous, the others under their own names, as
``user_<name>``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

from torch import Tensor

from bnscope.client import Client, ClientRun, rank_world
from bnscope.metrics import evaluation_metrics

__all__ = ["BNScopeCallback", "evaluation_metrics"]

#: A training loss as a module logs it: ``loss``, ``train_loss``, ``train/loss``, their _step fork.
_TRAIN_LOSS = re.compile(r"(?:(?:train|training)[_/.\-]?)?loss(?:_step)?", re.IGNORECASE)


class BNScopeCallback(pl.Callback):
    """Stream a Lightning fit to a BN Scope server; ``url`` and ``token`` are
    :class:`bnscope.client.Client`'s (no URL: yours at http://127.0.0.1:8000, else a local one),
    ``options`` go to :meth:`bnscope.client.Client.create_run` (``channel_interval``,
    ``flush_every``, ...)."""

    def __init__(
        self,
        name: str | None = None,
        url: str | None = None,
        token: str | None = None,
        *,
        probe: Tensor | Sequence[Any] | None = None,
        probe_every: int = 100,
        **options: Any,
    ) -> None:
        self.name, self.url, self.token, self.options = name, url, token, options
        self.probe, self.probe_every = probe, probe_every
        self.run: ClientRun | None = None
        self._logged_step = 0
        self._batches = 0  # manual optimization: batches trained

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 and rank_world()[1] == 1:
            return  # a rank without a process group: rank 0 alone reports
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.run = Client(self.url, self.token).create_run(
            name=self.name, steps_total=steps, **self.options
        )
        self.run.watch(
            pl_module,
            probe=self.probe,
            probe_every=self.probe_every,
            optimizer=list(trainer.optimizers) or None,
        )
        self._logged_step = trainer.global_step
        self._batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.run is None:
            return
        if pl_module.automatic_optimization:
            if trainer.global_step == self._logged_step:
                return  # no optimizer step yet: this micro-batch counts towards the next one
            self._logged_step = step = trainer.global_step
        else:  # manual: one step per batch, whatever optimizers it stepped (a GAN's two)
            self._batches += 1
            step = self._batches
        lr = None
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        self.run.log(step, _training_loss(outputs, trainer), lr=lr)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is None or self.run.finished or trainer.sanity_checking:
            return  # (trainer.validate() after the fit: its run has ended)
        metrics = evaluation_metrics(_validation_logged(trainer))
        if metrics:
            self.run.log_eval(trainer.global_step, **metrics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is not None:
            self.run.finish()
            self.run.client.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.run is not None:
            self.run.finish("failed", f"{type(exception).__name__}: {exception}")
            self.run.client.close()


def _training_loss(outputs: Any, trainer: pl.Trainer) -> Tensor | float:
    """The batch's loss: what training_step returned (automatic optimization), else what the
    module logged in it (manual optimization returns nothing): a metric named like ``loss``,
    ``train_loss`` or ``train/loss`` (or its ``_step`` fork), else the first whose name has
    ``loss`` in it (a GAN's ``g_loss``); NaN where it logged none."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, Tensor | float | int) and not isinstance(loss, bool):
        return loss
    logged = {k: v for k, v in trainer.callback_metrics.items() if "loss" in k.lower()}
    named = [k for k in logged if _TRAIN_LOSS.fullmatch(k)]
    for k in (*named, *logged):
        v = logged[k]
        if (isinstance(v, Tensor) and v.numel() == 1) or isinstance(v, float | int):
            return v
    return float("nan")


def _validation_logged(trainer: pl.Trainer) -> dict[str, Any]:
    """What the module logged in the validation that just ended: the validation loop's own
    results (Lightning offers no public view of them: its callback_metrics mix in the
    training's), or, where a Lightning version keeps them elsewhere, the callback metrics whose
    names say validation."""
    try:
        return dict(trainer._results.metrics(False)["callback"])  # type: ignore[union-attr]
    except (AttributeError, KeyError, TypeError):
        return {
            k: v
            for k, v in trainer.callback_metrics.items()
            if re.match(r"(val|valid|validation)[_/.\-]", k, re.IGNORECASE)
        }

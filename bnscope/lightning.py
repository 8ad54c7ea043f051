"""One line for PyTorch Lightning: ``Trainer(callbacks=[BNScopeCallback(name="resnet18")])``.

The callback opens a run on a BN Scope server when fitting starts (on rank 0), watches the
LightningModule (bncore.record.watcher: the module is left as it is), logs every optimizer step with
its loss and learning rate (the micro-batches of ``accumulate_grad_batches`` are averaged into the
step they belong to), and reports the run completed, or failed with the exception. Needs
``lightning`` (or ``pytorch_lightning``) installed.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

from torch import Tensor

from bnscope.client import Client, ClientRun

__all__ = ["BNScopeCallback"]


class BNScopeCallback(pl.Callback):
    """Stream a Lightning fit to a BN Scope server; ``options`` go to
    :meth:`bnscope.client.Client.create_run` (``channel_interval``, ``flush_every``, ...)."""

    def __init__(
        self,
        name: str | None = None,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        **options: Any,
    ) -> None:
        self.name, self.url, self.token, self.options = name, url, token, options
        self.run: ClientRun | None = None
        self._logged_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.run = Client(self.url, self.token).create_run(
            name=self.name, steps_total=steps, **self.options
        )
        self.run.watch(pl_module)
        self._logged_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.run is None or trainer.global_step == self._logged_step:
            return  # no optimizer step yet: this micro-batch counts towards the next one
        self._logged_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor | float | int):
            loss = float("nan")
        lr = None
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        self.run.log(trainer.global_step, loss, lr=lr)

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

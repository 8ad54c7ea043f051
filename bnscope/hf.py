"""One line for Hugging Face's Trainer: ``Trainer(callbacks=[BNScopeCallback(name="resnet")])``.

    from transformers import Trainer, TrainingArguments
    from bnscope.hf import BNScopeCallback

    trainer = Trainer(
        model=model,                       # any model with batch norm in it
        args=TrainingArguments(output_dir="out", eval_strategy="steps", eval_steps=100),
        train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
        callbacks=[BNScopeCallback(name="resnet", url="http://127.0.0.1:8000")],
    )
    trainer.train()

Needs ``transformers`` (and ``accelerate``, which its Trainer needs); importing ``bnscope`` or
``bnscope.client`` does not import them.

What the callback does, as :mod:`bnscope.lightning` does for Lightning:

- **When training begins** it opens a run on the server (``name``, ``url``, ``token``;
  ``options`` go to :meth:`bnscope.client.Client.create_run`: ``channel_interval``,
  ``flush_every``, ...; the run's ``steps_total`` is the Trainer's ``max_steps``) and watches
  the Trainer's model (bncore.record.watcher: the model is left as it is and trains bit for bit
  as without the callback). It tells the run the Trainer's optimizer (the weight decay on each
  BN's gamma and on the weights feeding them; accelerate's wrapper is looked through; where a
  Trainer makes its optimizer later, at the first step that has one). ``probe``/``probe_every``:
  the mode-gap probe (see :meth:`bnscope.client.ClientRun.watch`); the probe batch goes to the
  model as its first positional argument (``pixel_values``, ``input_ids``), off without one.
- **Every optimizer step** is logged, numbered as the Trainer's ``global_step`` counts it,
  right after the optimizer's step (``on_optimizer_step``: transformers 4.42 and later), while
  the gradients it stepped with (clipped, where ``max_grad_norm`` clips them) are still there:
  the Trainer zeroes them before ``on_step_end``. The micro-batches of gradient accumulation
  are one step: their BN statistics are averaged into it.
- **The loss of a step** is the Trainer's own: what its ``training_step`` returned for each
  micro-batch of the step (divided by ``gradient_accumulation_steps``, or normalized over the
  step's items, as the Trainer does), summed as the Trainer sums them. It is, bit for bit, the
  ``loss`` the Trainer reports when it logs every step (``logging_steps=1``); logging every N
  steps, the Trainer reports the mean of N of them. Where the Trainer's
  ``logging_nan_inf_filter`` puts the mean of earlier steps in place of a NaN or infinite loss,
  the run gets the NaN or infinity. On a data-parallel run it is rank 0's own loss (the
  Trainer's report averages the ranks'). How: transformers hands a callback neither the Trainer
  nor a step's loss (``on_log`` has only the mean since the last report), so the callback finds
  the Trainer calling it (the one whose callbacks it is among, in the calling frames) and,
  while it trains, wraps that Trainer's ``training_step`` to see what it returns; nothing else
  of the Trainer is changed, and the wrapper is gone when training ends. Should no Trainer be
  found (a loop of one's own calling the callback's hooks), the steps are logged with a NaN
  loss, with a warning.
- **The learning rate of a step** is the one the optimizer stepped with: its first parameter
  group's, read after its step and before the scheduler's (the Trainer's ``learning_rate``).
- **Each evaluation** (``on_evaluate``, during training) goes to the run at the global step,
  named as :func:`bnscope.metrics.evaluation_metrics` names them, the rule Lightning's callback
  uses too: ``eval_loss`` as test_loss, ``eval_accuracy`` (or ``eval_acc``) as test_acc where
  exactly one metric is that, every other as ``user_<name>`` (``eval_f1`` as
  ``user_eval_f1``). What the Trainer says of itself, not of the model, is left out: its speed
  (``eval_runtime``, ``eval_samples_per_second``, ``eval_steps_per_second``, ...), the time it
  took to prepare the model, and the ``epoch``. ``trainer.evaluate()`` after training ends is
  not sent: that run is over.
- **When training ends** the run is reported completed. transformers has no callback hook for
  an exception: a run whose ``train()`` raised is left running until the script's heartbeat
  stops (the process ends, or ``hang_timeout`` seconds pass without a step: see
  :meth:`bnscope.client.Client.create_run`), when the server marks it failed; or until the
  same callback's next ``train()`` begins (``auto_find_batch_size`` retries after running out
  of memory), which reports it failed at once and opens a new run. Until then the model stays
  watched (it trains and evaluates as before; its batch norms are recorded).

Only the main process (``state.is_world_process_zero``) opens the run. Under torch.distributed
(a data-parallel run started with ``torchrun`` or ``accelerate launch``), every process takes
part, as in any data-parallel script watched by :mod:`bnscope.client`: rank 0 registers the run
and owns its loss, evaluations and end, and each other rank reports its own BN statistics, as
``rank{k}.<layer>`` (``create_run`` is a collective there: a rank left out would hang rank 0).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bnscope.hf is a callback for Hugging Face's transformers.Trainer: install "
        "transformers and accelerate (pip install transformers accelerate)"
    ) from exc

import torch
from torch import Tensor

from bnscope.client import Client, ClientRun, rank_world
from bnscope.metrics import evaluation_metrics

__all__ = ["BNScopeCallback"]

#: What the Trainer adds to an evaluation's metrics of itself, not of the model: its speed
#: (transformers.trainer_utils.speed_metrics), the time it took to prepare the model, the epoch.
_TRAINER_OWN = re.compile(
    r"epoch|.+_(?:runtime|samples_per_second|steps_per_second|tokens_per_second"
    r"|model_preparation_time|jit_compilation_time)"
)


class BNScopeCallback(TrainerCallback):
    """Stream a ``transformers.Trainer``'s training to a BN Scope server (see the module
    docstring); ``options`` go to :meth:`bnscope.client.Client.create_run`
    (``channel_interval``, ``flush_every``, ...)."""

    def __init__(
        self,
        name: str | None = None,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        probe: Tensor | Sequence[Any] | None = None,
        probe_every: int = 100,
        **options: Any,
    ) -> None:
        self.name, self.url, self.token, self.options = name, url, token, options
        self.probe, self.probe_every = probe, probe_every
        self.run: ClientRun | None = None
        self._trainer: Any = None  # the Trainer training now, its training_step wrapped
        self._wrapper: Any = None
        self._before: Any = None  # the Trainer's own instance attribute training_step, if any
        self._losses: list[Tensor] = []  # the step's micro-batch losses, as training_step gave

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None and not self.run.finished:  # the last train() raised
            self._end("failed", "train() did not return: a new train() began before its end")
        if not (state.is_world_process_zero or rank_world()[1] > 1):
            return
        steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self.run = Client(self.url, self.token).create_run(
            name=self.name, steps_total=steps, **self.options
        )
        optimizer = _unwrapped(kwargs.get("optimizer"))
        self.run.watch(
            kwargs["model"], probe=self.probe, probe_every=self.probe_every, optimizer=optimizer
        )
        self._losses = []
        self._trainer = _calling_trainer(self)
        if self._trainer is None:
            warnings.warn(
                "BNScopeCallback: no transformers.Trainer calls this callback, so each step's "
                "loss cannot be seen: the steps are logged with a NaN loss",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            self._wrap(self._trainer)

    def _wrap(self, trainer: Any) -> None:
        """Keep what ``trainer.training_step`` returns (an instance attribute over the method,
        taken away at the end of training)."""
        step = trainer.training_step
        losses = self._losses
        self._before = vars(trainer).get("training_step")

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = step(*args, **kwargs)
            if isinstance(loss, Tensor):
                losses.append(loss.detach())
            return loss

        trainer.training_step = self._wrapper = training_step

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The step, logged here: its gradients are still there (the Trainer zeroes them before
        ``on_step_end``), and its learning rate is the one it stepped with (the scheduler steps
        after this)."""
        if self.run is None or self.run.finished:
            return
        optimizer = kwargs.get("optimizer")
        watcher, torch_optimizer = self.run.watcher, _unwrapped(optimizer)
        if watcher is not None and not watcher.optimizers and torch_optimizer is not None:
            watcher.optimizers = [torch_optimizer]  # one made after training began
        loss: Tensor | float = float("nan")
        if self._losses:
            # summed as the Trainer sums them (its _tr_loss: a tensor of torch's default dtype)
            total = torch.zeros((), device=self._losses[0].device)
            for micro in self._losses:
                total += micro
            loss = total
            self._losses.clear()
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None else None
        self.run.log(state.global_step + 1, loss, lr=lr)  # global_step counts it after this

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None or self.run.finished:  # (trainer.evaluate() after training)
            return
        metrics = kwargs.get("metrics") or {}
        own = {k: v for k, v in metrics.items() if not _TRAINER_OWN.fullmatch(k)}
        found = evaluation_metrics(own)
        if found:
            self.run.log_eval(state.global_step, **found)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end()

    def _end(self, status: str = "completed", message: str | None = None) -> None:
        trainer, self._trainer = self._trainer, None
        if trainer is not None and vars(trainer).get("training_step") is self._wrapper:
            if self._before is None:
                del trainer.training_step  # the Trainer's own method again
            else:
                trainer.training_step = self._before
        if self.run is not None:
            try:
                self.run.finish(status, message)
            finally:
                self.run.client.close()


def _calling_trainer(callback: TrainerCallback) -> Any:
    """The Trainer whose callbacks ``callback`` is among, found in the frames calling it (its
    ``_inner_training_loop`` calls the callback handler, which calls the callback); None if no
    caller is one."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if any(cb is callback for cb in getattr(handler, "callbacks", ())) and callable(
            getattr(owner, "training_step", None)
        ):
            return owner
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer in accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Optimizer) else None

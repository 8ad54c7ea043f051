"""Stream a training script of your own to a BN Scope server.

    import bnscope.client

    client = bnscope.client.Client("http://127.0.0.1:8000")    # token=... if the server has one
    with client.create_run(name="my resnet") as run:
        run.watch(model)                       # before or after making the optimizer
        for step, (x, y) in enumerate(loader, 1):
            loss = loss_fn(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            run.log(step, loss, lr=opt.param_groups[0]["lr"])
    # leaving the block reports the run completed (or failed, with the exception), and unwatches

``watch`` leaves the model as it is (same modules, Parameters, buffers and state_dict keys; its
training is bit for bit the same) and records every batch norm in it, whatever its form: see
:mod:`bncore.record.watcher`. ``log`` keeps the step's statistics on the device and sends them in
batches from a background thread. While the server is unreachable, batches wait (bounded) and are
sent when it is back; a heartbeat tells the server the script is alive, so a script that dies or
hangs leaves its run ``failed`` instead of ``running``.

``bnscope.client.watch(model, name=...)`` does the first two lines in one; ``BNScopeCallback``
(:mod:`bnscope.lightning`) does it all for a PyTorch Lightning Trainer. The client can also
launch runs that the server trains: ``client.launch(config)``.

Data-parallel scripts (torch.distributed initialized, DistributedDataParallel or not): every rank
calls ``create_run`` (rank 0 registers the run and hands its id to the others) and ``watch``;
each rank reports its own BN statistics, rank k > 0 under layer names ``rank{k}.<layer>``; rank 0
owns the run: the loss, the metadata, the heartbeat and how it ended.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import warnings
from typing import Any

import httpx
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import bncore
from bncore.record.sinks import HttpSink, error_message
from bncore.record.tables import Records
from bncore.record.watcher import Watcher
from bncore.status import RunStatus

__all__ = ["BNScopeDiagnosis", "Client", "ClientRun", "watch"]

log = logging.getLogger(__name__)


class BNScopeDiagnosis(UserWarning):
    """A batch-norm pitfall the server's BN doctor found in this run (once per rule)."""


class Client:
    """A BN Scope server's API."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 30.0
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            raise RuntimeError(
                f"{response.request.method} {response.request.url.path}: "
                f"{response.status_code} {error_message(response)}"
            )
        return response.json()

    def launch(self, config: bncore.RunConfig | dict[str, Any]) -> dict[str, Any]:
        """Queue a run for the server to train; returns the run."""
        body = config.model_dump(mode="json") if isinstance(config, bncore.RunConfig) else config
        return self._json(self.http.post("/api/runs", json=body))

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/api/runs/{run_id}"))

    def create_run(
        self,
        name: str | None = None,
        steps_total: int | None = None,
        flush_every: int = 100,
        flush_seconds: float = 2.0,
        channel_interval: int = 20,
        measure_interval: int = 20,
        patience: float = 120.0,
        heartbeat: float = 5.0,
        hang_timeout: float = 900.0,
        warn: bool = True,
    ) -> ClientRun:
        """Register a run that this process trains and reports.

        ``channel_interval``: per-channel arrays every that many logged steps;
        ``measure_interval``: what costs an extra pass over data (gradient norms through BN,
        the activation after it, the norms of the weight feeding it), every that many logged
        steps (see bncore.record.watcher). ``patience``: seconds to keep
        retrying while the server is unreachable. ``hang_timeout``: seconds without a ``log``
        after which the heartbeat stops and the server marks the run failed. ``heartbeat``: seconds
        between heartbeats while nothing else is sent (shorter if the server asks for it).
        """
        rank, world = _rank_world()
        run: dict[str, Any] = {}
        if rank == 0:
            run = self._json(
                self.http.post("/api/runs/client", json={"name": name, "steps_total": steps_total})
            )
        if world > 1:  # every rank reports to the run rank 0 registered
            shared = [run]
            dist.broadcast_object_list(shared, src=0)
            run = shared[0]
        told = run.get("heartbeat_s")  # the server's own timeout decides how often to beat
        return ClientRun(
            self,
            run["id"],
            rank=rank,
            world=world,
            token=run["write_token"],
            flush_every=flush_every,
            flush_seconds=flush_seconds,
            channel_interval=channel_interval,
            measure_interval=measure_interval,
            patience=patience,
            heartbeat=min(heartbeat, told) if told else heartbeat,
            hang_timeout=hang_timeout,
            warn=warn,
        )

    def close(self) -> None:
        self.http.close()


class ClientRun:
    """One run reported by this process; see the module docstring."""

    def __init__(
        self,
        client: Client,
        run_id: str,
        *,
        flush_every: int = 100,
        flush_seconds: float = 2.0,
        channel_interval: int = 20,
        measure_interval: int = 20,
        patience: float = 120.0,
        heartbeat: float | None = 5.0,
        hang_timeout: float = 900.0,
        token: str | None = None,
        rank: int = 0,
        world: int = 1,
        warn: bool = True,
    ) -> None:
        self.client, self.id = client, run_id
        self._heard: list[dict[str, Any]] = []  # the doctor's diagnoses, not yet warned of
        self._heard_lock = threading.Lock()
        self._warned: set[str] = set()
        self.rank, self.world = rank, world
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.channel_interval, self.measure_interval = channel_interval, measure_interval
        self.hang_timeout = hang_timeout
        self._last_log = self._last_flush = time.time()
        self.sink = HttpSink(
            client.http,
            run_id,
            patience=patience,
            heartbeat=heartbeat if rank == 0 else None,  # rank 0 speaks for the run
            alive=self._alive,
            token=token,
            sequenced=rank == 0,  # the run's batch numbers are rank 0's
            on_ack=self._hear if warn else None,
        )
        self.watcher: Watcher | None = None
        self._steps: list[tuple[int, float | Tensor, float, float, float]] = []
        self._meta_sent: dict[str, Any] | None = None
        self._finished = False

    @property
    def layers(self) -> list[str]:
        """The watched BN layers' names (module paths), in order of execution."""
        return list(self.watcher.layers) if self.watcher is not None else []

    def _alive(self) -> bool:
        return time.time() - self._last_log < self.hang_timeout

    def watch(self, model: nn.Module) -> nn.Module:
        """Record every batch norm of ``model`` from its next forward on; returns ``model``
        itself, unchanged (see bncore.record.watcher)."""
        if self.watcher is not None:
            raise RuntimeError("this run already watches a model; unwatch() it first")
        self.watcher = Watcher(
            model, channel_interval=self.channel_interval, measure_interval=self.measure_interval
        )
        return model

    def unwatch(self) -> None:
        """Detach from the model: no hook or patch is left behind."""
        if self.watcher is not None:
            self.watcher.close()

    @torch.no_grad()
    def log(self, step: int, loss: float | Tensor, lr: float | None = None) -> None:
        """After the backward of ``step`` (before or after the optimizer's step): record the
        BN layers' statistics since the last log, and the loss; sends now and then."""
        if self.watcher is None:
            raise RuntimeError("call watch(model) before log()")
        if self._finished:
            raise RuntimeError(f"run {self.id} has finished; create a new run to log more")
        now = time.time()
        self.watcher.log(step)
        loss_value = loss.detach().reshape(()) if isinstance(loss, Tensor) else float(loss)
        lr_value = math.nan if lr is None else float(lr)
        self._steps.append((step, loss_value, lr_value, now - self._last_log, now))
        self._last_log = now
        if len(self._steps) >= self.flush_every or now - self._last_flush >= self.flush_seconds:
            self.flush()
        if self._heard:
            self._warn()

    def _hear(self, ack: dict[str, Any]) -> None:
        """A batch's acknowledgement (on the sink's thread): its diagnoses wait for the
        script's thread."""
        with self._heard_lock:
            self._heard += ack.get("diagnoses") or []

    def _warn(self) -> None:
        """Each new rule the doctor found, as a warning in the script (once per rule)."""
        with self._heard_lock:
            heard, self._heard = self._heard, []
        for d in heard:
            if d["rule"] in self._warned or d.get("silenced") or d.get("last_step") is not None:
                continue
            self._warned.add(d["rule"])
            layers = ", ".join(d["layers"]) or "the run"
            warnings.warn(
                f"BN Scope: {d['severity']} {d['rule']} in {layers}: {d['message']} "
                f"Fix: {d['fix']}",
                BNScopeDiagnosis,
                stacklevel=_script_level(),
            )

    def flush(self) -> None:
        """Send what was logged since the last flush (one transfer from the device)."""
        if not self._steps or self.watcher is None:
            return
        # the tables are built here: on a sink's thread, contention for the GIL cost the
        # training loop more (3% of a ResNet-18 step against 0.5%)
        rec = self.watcher.flush()
        step, loss, lr, step_time, wall = zip(*self._steps, strict=True)
        losses = [v for v in loss if isinstance(v, Tensor)]
        if losses and len(losses) == len(loss):  # one transfer for all of them
            loss_np = torch.stack(losses).float().cpu().numpy()
        else:
            loss_np = np.asarray([float(v) for v in loss], np.float32)
        steps = {
            "step": np.asarray(step, np.int64),
            "loss": loss_np,
            "lr": np.asarray(lr),
            "step_time": np.asarray(step_time),
            "time": np.asarray(wall),
        }
        self._steps, self._last_flush = [], time.time()
        if self.rank > 0:  # its own BN statistics, under its own names; the loss is rank 0's
            for table in (rec.layers, rec.channels):
                if table:
                    table["layer"] = np.asarray([f"rank{self.rank}.{n}" for n in table["layer"]])
            self.sink.write(Records(layers=rec.layers, channels=rec.channels))
            return
        records = Records(steps=steps, layers=rec.layers, channels=rec.channels)
        meta = {**_every_rank(self.watcher.meta(), self.world), "source": "bnscope.client"}
        if meta != self._meta_sent:  # the first flush, or layers that first ran since
            self.sink.update_meta(meta)
            self._meta_sent = meta
        self.sink.write(records)

    def finish(self, status: str = RunStatus.COMPLETED.value, message: str | None = None) -> None:
        """Send what is left and report how the run ended; unwatches the model."""
        if self._finished:
            return
        self._finished = True
        self.unwatch()
        if self.rank > 0:  # its records sent; how the run ended is rank 0's to say
            try:
                self.flush()
                self.sink.drain()
            finally:
                self.sink.abandon()
            self._warn()
            return
        try:
            self.flush()
        finally:
            if self.sink.dropped:
                note = (
                    f"{self.sink.dropped} batches of records were dropped while the server "
                    "could not be reached"
                )
                message = f"{message}; {note}" if message else note
            self.sink.finish(
                {"status": status, "message": message, "steps_done": None, "final": None}
            )
        self._warn()  # what the last batches showed

    def __enter__(self) -> ClientRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.finish()
            return
        try:
            self.finish("failed", f"{type(exc).__name__}: {exc}")
        except Exception as report_error:  # never hide the script's own exception
            log.warning("bnscope: could not report run %s as failed: %s", self.id, report_error)


def _script_level() -> int:
    """The ``stacklevel`` of the script's own line (``run.log``, the ``with`` block's end), for
    a warning raised inside this module (through torch's no_grad wrapper)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename == __file__ or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    return level


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _every_rank(meta: dict[str, Any], world: int) -> dict[str, Any]:
    """Rank 0's layer metadata extended with every other rank's layers (the same model)."""
    if world == 1:
        return meta
    out = {**meta, "replicas": world}
    for key in ("channels", "tracked_units", "layer_kinds"):
        out[key] = list(meta[key]) * world
    out["layers"] = list(meta["layers"]) + [
        f"rank{r}.{name}" for r in range(1, world) for name in meta["layers"]
    ]
    return out


def watch(
    model: nn.Module,
    name: str | None = None,
    url: str = "http://127.0.0.1:8000",
    token: str | None = None,
    **options: Any,
) -> ClientRun:
    """One line for a plain loop: a new run on the server at ``url``, watching ``model``.

        with bnscope.client.watch(model, name="resnet18") as run:
            for step, (x, y) in enumerate(loader, 1):
                ...
                run.log(step, loss)

    ``options`` go to :meth:`Client.create_run`.
    """
    run = Client(url, token).create_run(name=name, **options)
    run.watch(model)
    return run

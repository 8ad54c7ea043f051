"""Stream a training script of your own to a BN Scope server.

    import bnscope.client

    client = bnscope.client.Client()    # or Client("http://host:8000", token=...)
    with client.create_run(name="my resnet") as run:
        run.watch(model)                       # before or after making the optimizer
        for step, (x, y) in enumerate(loader, 1):
            loss = loss_fn(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            run.log(step, loss, lr=opt.param_groups[0]["lr"])
    # leaving the block reports the run completed (or failed, with the exception), and unwatches

``Client()`` with no URL needs no server set up: it uses yours at http://127.0.0.1:8000 if one
answers there, else starts one of its own on 127.0.0.1 for this process (runs in
``./bnscope-data``; stopped when the process ends): see :class:`Client` and bnscope.local. In
a notebook, ``run.show()``, or ``run`` as a cell's last expression, shows the run's live view
inline (:meth:`ClientRun.show`).

``watch`` leaves the model as it is (same modules, Parameters, buffers and state_dict keys; its
training is bit for bit the same) and records every batch norm in it, whatever its form: see
:mod:`bncore.record.watcher`. ``log`` keeps the step's statistics on the device and sends them in
batches from a background thread. While the server is unreachable, batches wait (bounded) and are
sent when it is back; a heartbeat tells the server the script is alive, so a script that dies or
hangs leaves its run ``failed`` instead of ``running``.

Evaluations: ``run.log_eval(step, test_loss=..., test_acc=...)`` (any other metric by name, as
``user_<name>``: see :meth:`ClientRun.log_eval`). Opt-in, ``run.watch(model, probe=batch,
probe_every=K)`` runs one held batch in eval and in train mode every K logged steps, leaving no
trace: the mode gap, and per layer how its eval-mode input stands against its running
statistics (bncore.record.probe). ``run.watch(model, optimizer=opt)`` tells the run the weight
decay on each BN's gamma and on the weights feeding them.

``bnscope.client.watch(model, name=...)`` does the first two lines in one; ``BNScopeCallback``
(:mod:`bnscope.lightning`) does it all for a PyTorch Lightning Trainer. The client can also
launch runs that the server trains: ``client.launch(config)``.

Data-parallel scripts (torch.distributed initialized, DistributedDataParallel or not): every rank
calls ``create_run`` (rank 0 registers the run and hands its id to the others) and ``watch``;
each rank reports its own BN statistics, rank k > 0 under layer names ``rank{k}.<layer>``; rank 0
owns the run: the loss, the metadata, the heartbeat and how it ended.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import bncore
from bncore import statistics
from bncore.record.probe import mode_gap_probe
from bncore.record.sinks import HttpSink, Refused, error_message
from bncore.record.tables import Records, Table
from bncore.record.watcher import Watcher
from bncore.status import RunStatus

__all__ = ["BNScopeDiagnosis", "Client", "ClientRun", "eval_column", "rank_world", "watch"]

#: What an optimizer argument may be: one, several (a GAN's), or none.
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None

log = logging.getLogger(__name__)


class BNScopeDiagnosis(UserWarning):
    """A batch-norm pitfall the server's BN doctor found in this run (once per rule)."""


class Client:
    """A BN Scope server's API.

    ``url``: the server, as given (``Client("http://127.0.0.1:8000")``: that server, nothing
    started). Left out, the server a script or notebook needs no setup for (bnscope.local): this
    process's local server if it started one, else a BN Scope server answering at
    http://127.0.0.1:8000 (``bnscope serve``'s default), else a new local ``bnscope serve`` on a
    free port of 127.0.0.1 with its runs in ``./bnscope-data``, shared by every later
    ``Client()`` of this process and stopped when it ends (RuntimeError, with the end of the
    server's output, if it does not start). On a data-parallel script's rank k > 0, a client
    given no URL takes rank 0's in :meth:`create_run`.

    ``token``: the server's bearer token, if it has one (a local server has none).
    """

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.token, self.timeout = token, timeout
        self._url = url.rstrip("/") if url is not None else None
        self._http: httpx.Client | None = None
        if self._url is None and rank_world()[0] == 0:
            self._url = _server_url()
        self._protects_reads: bool | None = None

    @property
    def url(self) -> str:
        """The server's base URL (``http://127.0.0.1:PORT``)."""
        if self._url is None:  # a rank k > 0 asked before create_run told it rank 0's
            self._url = _server_url()
        return self._url

    @property
    def dashboard_url(self) -> str:
        """The server's dashboard (a run's own view: :attr:`ClientRun.dashboard_url`)."""
        return f"{self.url}/dashboard/"

    @property
    def http(self) -> httpx.Client:
        """The HTTP client every call goes through (the token in its headers)."""
        if self._http is None:
            headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)
        return self._http

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def protects_reads(self) -> bool:
        """Whether the server lets only its token's holders read (``--protect-reads``): then a
        browser sees the dashboard once it holds the token's cookie (see
        :meth:`ClientRun.show`). Asked once; False if the server cannot be asked."""
        if self._protects_reads is None:
            try:
                with httpx.Client(timeout=2.0) as anonymous:
                    answer = anonymous.get(f"{self.url}/api/runs", params={"limit": 1})
                self._protects_reads = answer.status_code == 401
            except httpx.HTTPError:
                return False
        return self._protects_reads

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
        rank, world = rank_world()
        run: dict[str, Any] = {}
        if rank == 0:
            run = self._json(
                self.http.post("/api/runs/client", json={"name": name, "steps_total": steps_total})
            )
            run["server_url"] = self.url
        if world > 1:  # every rank reports to the run rank 0 registered
            shared = [run]
            dist.broadcast_object_list(shared, src=0)
            run = shared[0]
            if self._url is None:  # given no URL: rank 0's server, never one of its own
                self._url = run["server_url"]
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
        if self._http is not None:
            self._http.close()


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
        self.probe: Tensor | None = None
        self.probe_every = 0
        self._steps: list[tuple[int, float | Tensor, float, float, float]] = []
        self._evals: dict[int, dict[str, float]] = {}  # step -> evals columns
        self._layer_evals: dict[tuple[int, str], dict[str, float]] = {}  # (step, layer) -> ...
        self._meta_sent: dict[str, Any] | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` was called: nothing more can be logged."""
        return self._finished

    @property
    def layers(self) -> list[str]:
        """The watched BN layers' names (module paths), in order of execution."""
        return list(self.watcher.layers) if self.watcher is not None else []

    def _alive(self) -> bool:
        return time.time() - self._last_log < self.hang_timeout

    @property
    def dashboard_url(self) -> str:
        """The run's live view: the dashboard's run view of it."""
        return f"{self.client.dashboard_url}?tab=run&run={self.id}"

    def show(self, height: int = 720) -> None:
        """The run's live view, updating as it trains: in a notebook (Jupyter, JupyterLab, VS
        Code), inline, the dashboard's run view in an IFrame ``height`` pixels high, with a link
        that opens it in a tab of its own; elsewhere (a terminal, no IPython) its URL, printed.
        A run as the last expression of a cell shows the same.

        The view is loaded by the browser, which must reach the server's address: the local
        server (127.0.0.1) from a notebook opened on the machine it runs on; for a kernel on
        another machine, forward the port or give ``Client`` a URL the browser reaches. A
        server with ``--protect-reads`` shows its pages to a browser that holds its token's
        cookie: open the dashboard once, in a tab, as ``<url>/dashboard/?token=<token>``; the
        browser sends that cookie to the inline view only where the notebook's page has the
        server's host (``127.0.0.1`` and ``localhost`` are two hosts). The token is never written
        into the notebook (outputs are saved with it); the view says what to do.
        """
        text = self._view_text()
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            print(text)
            return
        if get_ipython() is None:  # IPython installed, not running this
            print(text)
            return
        # text/plain where HTML is not shown (a terminal IPython)
        display({"text/html": self._repr_html_(height), "text/plain": text}, raw=True)

    def _view_text(self) -> str:
        return f"BN Scope run {self.id}: {self.dashboard_url}"

    def _repr_html_(self, height: int = 720) -> str:
        """The inline live view (:meth:`show`): IPython shows a run this way."""
        src, run = html.escape(self.dashboard_url), html.escape(self.id)
        note = ""
        if self.client.token and self.client.protects_reads():
            note = (
                "<p>This server protects reads: the view below shows once this browser holds "
                f'the token\'s cookie. Open <a href="{src}" target="_blank" rel="noopener">the '
                "run</a> once with <code>&amp;token=&lt;your token&gt;</code> added to its "
                "address (left out of this notebook on purpose), then run this cell again; "
                "inline, the cookie is sent only where this notebook's page has the server's "
                "host.</p>"
            )
        return (
            f'<div class="bnscope-run">{note}'
            f'<iframe src="{src}" title="BN Scope run {run}" width="100%" height="{int(height)}" '
            'style="border: 1px solid #ddd; border-radius: 4px"></iframe>'
            f'<div><a href="{src}" target="_blank" rel="noopener">Open run {run} in BN Scope'
            "</a></div></div>"
        )

    def __repr__(self) -> str:
        return f"<ClientRun {self.id}: {self.dashboard_url}>"

    def watch(
        self,
        model: nn.Module,
        *,
        probe: Tensor | Sequence[Any] | None = None,
        probe_every: int = 100,
        optimizer: Optimizers = None,
    ) -> nn.Module:
        """Record every batch norm of ``model`` from its next forward on; returns ``model``
        itself, unchanged (see bncore.record.watcher).

        ``probe``: a batch of inputs (a tensor, or an (inputs, targets) pair: its inputs),
        kept (a copy, on the model's device) for the mode-gap probe: every ``probe_every``
        logged steps, after the step, it goes through the model once in eval mode and once in
        train mode (bncore.record.probe.mode_gap_probe: no gradient, every buffer, the
        train/eval modes and the random state put back, so training goes on bit for bit as
        without it; neither recorded nor counted as the layers' forwards; the model's own
        hooks do see them). It records ``mode_gap`` (evals) and, per layer,
        ``eval_mean_gap`` and ``eval_var_gap`` (layer_evals). Off without a probe.

        ``optimizer`` (or several): the run's meta says which weight decay each layer's gamma
        and the weights feeding the layers get (Watcher.meta's ``optimizer``).
        """
        if self.watcher is not None:
            raise RuntimeError("this run already watches a model; unwatch() it first")
        if probe_every < 1:
            raise ValueError(f"probe_every must be at least 1, got {probe_every}")
        held = None if probe is None else _probe_batch(model, probe)
        self.watcher = Watcher(
            model,
            channel_interval=self.channel_interval,
            measure_interval=self.measure_interval,
            optimizer=optimizer,
        )
        self.probe, self.probe_every = held, probe_every
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
        logged = self.watcher.logged
        if self.probe is not None and logged and logged % self.probe_every == 0:
            self._probe_modes(step)
        loss_value = loss.detach().reshape(()) if isinstance(loss, Tensor) else float(loss)
        lr_value = math.nan if lr is None else float(lr)
        self._steps.append((step, loss_value, lr_value, now - self._last_log, now))
        self._last_log = now
        first = logged == 1  # the layers and what they are, on the server at once
        if (
            first
            or len(self._steps) >= self.flush_every
            or now - self._last_flush >= self.flush_seconds
        ):
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

    def _probe_modes(self, step: int) -> None:
        """The mode-gap probe on the held batch (see :meth:`watch`), into the next flush."""
        assert self.watcher is not None and self.probe is not None
        norms = {name: layer.module for name, layer in self.watcher.layers.items()}
        with self.watcher.paused():
            found = mode_gap_probe(self.watcher.model, self.probe, norms)
        self._evals.setdefault(step, {})["mode_gap"] = found.mode_gap
        for name, (mean_gap, var_gap) in found.layers.items():
            row = self._layer_evals.setdefault((step, name), {})
            row.update(eval_mean_gap=mean_gap, eval_var_gap=var_gap)

    def log_eval(
        self,
        step: int,
        test_loss: float | Tensor | None = None,
        test_acc: float | Tensor | None = None,
        **more: float | Tensor | None,
    ) -> None:
        """An evaluation at ``step``: one row of the run's ``evals`` table, sent now (with
        what was logged before it). ``test_acc`` is a share (0.9, not 90).

        Names: the registry's evaluation statistics (bncore.statistics, table ``evals``:
        test_loss, test_acc, train_loss, train_acc, ...) are kept as they are; any other
        name is the script's own metric, recorded as ``user_<name>`` (every character other
        than a letter, digit or _ written as _: ``val/f1`` -> ``user_val_f1``; names of
        other tables too: ``loss`` -> ``user_loss``), which the server accepts and shows by
        that name. A name longer than 59 characters is a ValueError. None values are left
        out. On a data-parallel script's rank k > 0 evaluations are not sent (the run's are
        rank 0's).
        """
        if self._finished:
            raise RuntimeError(f"run {self.id} has finished; create a new run to log more")
        columns = {eval_column(k): v for k, v in (("test_loss", test_loss),
                   ("test_acc", test_acc), *more.items()) if v is not None}  # fmt: skip
        if not columns:
            return
        row = self._evals.setdefault(step, {})
        row.update({k: float(v) for k, v in columns.items()})
        self.flush()

    def flush(self) -> None:
        """Send what was logged since the last flush (one transfer from the device)."""
        if not (self._steps or self._evals or self._layer_evals):
            return
        # the tables are built here: on a sink's thread, contention for the GIL cost the
        # training loop more (3% of a ResNet-18 step against 0.5%)
        rec = self.watcher.flush() if self.watcher is not None else Records()
        steps = self._steps_table()
        layer_evals = _alike_tables(
            [{"step": s, "layer": n, **v} for (s, n), v in sorted(self._layer_evals.items())]
        )
        evals = _alike_tables([{"step": s, **v} for s, v in sorted(self._evals.items())])
        self._steps, self._evals, self._layer_evals = [], {}, {}
        rec.evals, rec.layer_evals = evals.pop(0), layer_evals.pop(0)
        # evaluations of other columns in records of their own: never NaN over a value
        more = [Records(evals=t) for t in evals] + [Records(layer_evals=t) for t in layer_evals]
        self._last_flush = time.time()
        if self.rank > 0:  # its own BN statistics, under its own names; the rest is rank 0's
            for r in (rec, *more):
                for table in (r.layers, r.channels, r.layer_evals):
                    if table:
                        names = table["layer"]
                        table["layer"] = np.asarray([f"rank{self.rank}.{n}" for n in names])
            self.sink.write(
                Records(layers=rec.layers, channels=rec.channels, layer_evals=rec.layer_evals)
            )
            for r in more:
                if r.layer_evals:
                    self.sink.write(Records(layer_evals=r.layer_evals))
            return
        rec.steps = steps
        if self.watcher is not None:
            meta = {**_every_rank(self.watcher.meta(), self.world), "source": "bnscope.client"}
            if meta != self._meta_sent:  # the first flush, or what was learnt since
                self.sink.update_meta(meta)
                self._meta_sent = meta
        for r in (rec, *more):
            self.sink.write(r)

    def _steps_table(self) -> Table:
        if not self._steps:
            return {}
        step, loss, lr, step_time, wall = zip(*self._steps, strict=True)
        losses = [v for v in loss if isinstance(v, Tensor)]
        if losses and len(losses) == len(loss):  # one transfer for all of them
            loss_np = torch.stack(losses).float().cpu().numpy()
        else:
            loss_np = np.asarray([float(v) for v in loss], np.float32)
        return {
            "step": np.asarray(step, np.int64),
            "loss": loss_np,
            "lr": np.asarray(lr),
            "step_time": np.asarray(step_time),
            "time": np.asarray(wall),
        }

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
            self.sink.drain()
        except Exception as exc:
            self.sink.abandon()
            if isinstance(exc.__cause__ or exc, Refused):  # the server is there, and says no
                self._report_failed(f"its records were refused: {exc.__cause__ or exc}")
            raise
        if self.sink.dropped:
            note = (
                f"{self.sink.dropped} batches of records were dropped while the server "
                "could not be reached"
            )
            message = f"{message}; {note}" if message else note
        self.sink.finish({"status": status, "message": message, "steps_done": None, "final": None})
        self._warn()  # what the last batches showed

    def _report_failed(self, why: str) -> None:
        """Tell the server the run failed, saying ``why``; a server that does not take it
        leaves the run to its reaper (``client_timeout``)."""
        body = {"status": RunStatus.FAILED.value, "message": why[:10_000]}
        with contextlib.suppress(httpx.HTTPError, OSError, Refused):
            self.sink.post("status", json.dumps(body).encode())

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


def eval_column(name: str) -> str:
    """The ``evals`` column of a metric logged by name (:meth:`ClientRun.log_eval`'s rule): a
    registry evaluation statistic as it is, any other name as ``user_<name>``."""
    found = statistics.lookup(name)
    if found is not None and found.table == "evals":
        return name
    column = "user_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
    if statistics.USER_METRIC.fullmatch(column) is None:
        raise ValueError(
            f"evaluation metric {name!r}: a name is 1 to 59 characters (recorded as user_<name>)"
        )
    return column


def _alike_tables(rows: list[dict[str, Any]]) -> list[Table]:
    """Rows (dicts with a ``step``, maybe a ``layer``) as tables, one per set of columns, in
    order of first appearance (at least one, maybe empty)."""
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(frozenset(r), []).append(r)
    tables: list[Table] = []
    for group in groups.values():
        table: Table = {"step": np.asarray([r["step"] for r in group], np.int64)}
        for k in group[0]:
            if k == "layer":
                table[k] = np.asarray([r[k] for r in group])
            elif k != "step":
                table[k] = np.asarray([r[k] for r in group], np.float64)
        tables.append(table)
    return tables or [{}]


def _probe_batch(model: nn.Module, probe: Tensor | Sequence[Any]) -> Tensor:
    """The probe's inputs, a copy of its own on the model's device."""
    x = probe[0] if isinstance(probe, tuple | list) and probe else probe
    if not isinstance(x, Tensor):
        raise TypeError(
            "probe: a batch of inputs (a tensor, or an (inputs, targets) pair), got "
            f"{type(x).__name__}"
        )
    if x.dim() == 0 or len(x) < 2:
        raise ValueError("probe: at least 2 examples (train mode normalizes with the batch's own)")
    device = next((t.device for t in (*model.parameters(), *model.buffers())), x.device)
    return x.detach().to(device, copy=True)


def _server_url() -> str:
    """The server of a client given no URL (bnscope.local, imported only then: it starts
    ``bnscope serve`` as a process, and imports no server code)."""
    from bnscope.local import server_url

    return server_url()


def rank_world() -> tuple[int, int]:
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
    url: str | None = None,
    token: str | None = None,
    *,
    probe: Tensor | Sequence[Any] | None = None,
    probe_every: int = 100,
    optimizer: Optimizers = None,
    **options: Any,
) -> ClientRun:
    """One line for a plain loop: a new run on the server at ``url``, watching ``model``.

        with bnscope.client.watch(model, name="resnet18", optimizer=opt) as run:
            for step, (x, y) in enumerate(loader, 1):
                ...
                run.log(step, loss)

    ``url`` and ``token`` are :class:`Client`'s (no URL: the local server, see there);
    ``probe``, ``probe_every``, ``optimizer`` go to :meth:`ClientRun.watch`, ``options`` to
    :meth:`Client.create_run`.
    """
    run = Client(url, token).create_run(name=name, **options)
    run.watch(model, probe=probe, probe_every=probe_every, optimizer=optimizer)
    return run

"""A training run in its own process: the bncore engine, sending its records to the API.

The worker talks to the server only through the documented HTTP endpoints (the same ones a
user's own script would use): it reports ``running`` with the run's metadata, streams batches of
records, and reports how the run ended. It stops when cancelled, and when its parent server is
gone (it then has no one to report to).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
import traceback
from typing import Any

import httpx
import orjson

from bncore.record.sinks import RUN_TOKEN_HEADER, HttpSink

PARENT_POLL = 0.2  # seconds between looks at whether the server is still there (a Ray task)
PARENT_GRACE = 0.5  # seconds a worker whose server died gets to stop by itself, then it exits

#: The process that imported this module, and whether torch was imported before it: a worker
#: forked from the local executor's fork server (server.executors.PRELOAD) finds another pid
#: here, and True; a spawned one, its own pid (it imports this module to find ``main``).
_IMPORTED_BY, _TORCH_BEFORE = os.getpid(), "torch" in sys.modules


def watch_parent() -> threading.Event:
    """Notice that the server is gone, even while training is blocked in a send that the sink
    retries: a watchdog thread sets the returned event (the training loop stops at its next
    step), then, PARENT_GRACE seconds later, ends the process. The server is the process that
    started this one through multiprocessing, its parent or not (a fork server's child has the
    fork server as its parent, which outlives the server while any of its children lives):
    multiprocessing's pipe from it closes when it dies, at once. Elsewhere (a Ray task) the
    parent, looked at every PARENT_POLL seconds. (Not PR_SET_PDEATHSIG: it follows the thread
    that made the process, not the server.)"""
    orphaned = threading.Event()
    server, parent = multiprocessing.parent_process(), os.getppid()

    def watch() -> None:
        if server is not None:
            server.join()  # returns when the server's end of the pipe closes: it has died
        else:
            while os.getppid() == parent:
                time.sleep(PARENT_POLL)
        orphaned.set()
        time.sleep(PARENT_GRACE)
        os._exit(3)  # nobody is left to report to; what it acknowledged is stored

    threading.Thread(target=watch, name="bnscope-parent-watch", daemon=True).start()
    return orphaned


class _WorkerSink(HttpSink):
    """The worker's sink: the run's meta says how its worker started (``worker``: whether it
    was forked with torch already imported, ``preloaded``; its torch threads), so that it can
    be seen, and tested, from the API."""

    def __init__(self, *args: Any, started: dict[str, Any], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.started = started

    def start(self, meta: dict[str, Any]) -> None:
        super().start({**meta, "worker": self.started})


def send_heartbeats(api_url: str, run_id: str, headers: dict[str, str], every: float) -> None:
    """Tell the server every ``every`` seconds, from a thread of its own, that this worker is
    alive: one that stops (hung, stopped, swapped out for good) is killed by the server after
    ``--worker-timeout`` seconds and its run failed (server.service.runs). A beat that fails is
    left: the next one, or the records, will tell."""

    def beat() -> None:
        with httpx.Client(base_url=api_url, headers=headers, timeout=5.0) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    client.post(f"/api/runs/{run_id}/heartbeat")
                time.sleep(every)

    threading.Thread(target=beat, name="bnscope-heartbeat", daemon=True).start()


#: How much lower a worker's CPU priority is than the server's (os.nice): on a machine whose
#: cores all train, API reads and live streams still answer in time (benchmarks/load.py).
NICE = 10


def main(
    run_id: str,
    config_json: str,
    api_url: str,
    token: str | None,
    threads: int,
    cancel: Any,
    data_root: str | None = None,
    write_token: str | None = None,
    heartbeat_s: float | None = None,
) -> None:
    """Process entry point (started by server.executors for server.scheduler). ``data_root``:
    datasets are read only under it (checked by the service too; here again, before any file is
    opened); ``write_token``: the run's (server.keys), minted for this worker; ``heartbeat_s``:
    how often it says it is alive (:func:`send_heartbeats`)."""
    # forked with torch imported (server.executors), not importing it now
    started: dict[str, Any] = {"preloaded": os.getpid() != _IMPORTED_BY and _TORCH_BEFORE}
    orphaned = watch_parent()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if heartbeat_s:  # from the start: importing torch and loading the data take a while
        beats = {**headers, **({RUN_TOKEN_HEADER: write_token} if write_token else {})}
        send_heartbeats(api_url, run_id, beats, heartbeat_s)
    import torch

    from bncore.run.config import RunConfig
    from bncore.run.data import load_dataset
    from bncore.run.distributed import train_replicas
    from bncore.run.engine import Trainer

    torch.set_num_threads(threads)
    started["threads"] = torch.get_num_threads()
    with contextlib.suppress(OSError):
        os.nice(NICE)  # training is batch work: the server's answers come first
    with httpx.Client(base_url=api_url, headers=headers, timeout=30.0) as client:
        sink = _WorkerSink(client, run_id, token=write_token, started=started)
        try:
            config = RunConfig.model_validate_json(config_json)
            stop = lambda: cancel.is_set() or orphaned.is_set()  # noqa: E731
            if config.distributed.replicas > 1:  # this process is rank 0 of the replicas
                # replicas flush together, every so many steps (no clock to agree on)
                train_replicas(config, sink, data_root, stop, flush_every=25)
            else:
                trainer = Trainer(config, load_dataset(config.data, data_root))
                trainer.run(sink, should_stop=stop, flush_every=200, flush_seconds=0.05)
        except Exception as exc:
            if orphaned.wait(PARENT_POLL):  # one look more: a send failing as the server died
                return  # the server is gone: nobody to tell
            message = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(httpx.HTTPError, OSError):
                sink.post(
                    "status",
                    orjson.dumps(
                        {
                            "status": "failed",
                            "message": message[:2000],
                            "traceback": traceback.format_exc()[-4000:],
                        }
                    ),
                )
            raise SystemExit(1) from None

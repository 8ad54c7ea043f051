"""A training run in its own process: the bncore engine, sending its records to the API.

The worker talks to the server only through the documented HTTP endpoints (the same ones a
user's own script would use): it reports ``running`` with the run's metadata, streams batches of
records, and reports how the run ended. It stops when cancelled, and when its parent server is
gone (it then has no one to report to).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from typing import Any

import httpx
import orjson

from bncore.record.sinks import RUN_TOKEN_HEADER, HttpSink

PARENT_POLL = 0.2  # seconds between looks at whether the server is still there
PARENT_GRACE = 0.5  # seconds a worker whose server died gets to stop by itself, then it exits


def watch_parent(parent: int) -> threading.Event:
    """Notice within PARENT_POLL + PARENT_GRACE seconds that the server (``parent``) is gone,
    even while training is blocked in a send that the sink retries: a watchdog thread sets the
    returned event (the training loop stops at its next step), then ends the process. (Not
    PR_SET_PDEATHSIG: it follows the thread that spawned the worker, not the server.)"""
    orphaned = threading.Event()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        orphaned.set()
        time.sleep(PARENT_GRACE)
        os._exit(3)  # nobody is left to report to; what it acknowledged is stored

    threading.Thread(target=watch, name="bnscope-parent-watch", daemon=True).start()
    return orphaned


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
    """Process entry point (spawned by server.scheduler). ``data_root``: datasets are read only
    under it (checked by the service too; here again, before any file is opened);
    ``write_token``: the run's (server.keys), minted for this worker; ``heartbeat_s``: how
    often it says it is alive (:func:`send_heartbeats`)."""
    parent = os.getppid()
    orphaned = watch_parent(parent)
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
    with contextlib.suppress(OSError):
        os.nice(NICE)  # training is batch work: the server's answers come first
    with httpx.Client(base_url=api_url, headers=headers, timeout=30.0) as client:
        sink = HttpSink(client, run_id, token=write_token)
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
            if orphaned.is_set() or os.getppid() != parent:
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

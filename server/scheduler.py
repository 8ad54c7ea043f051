"""Runs waiting, runs training: each in its own process (a distributed run in one per replica),
at most ``max_runs`` processes at once, on this machine or as Ray tasks (server.executors).

The scheduler starts queued runs as slots free up, cancels (a flag the worker checks every step,
then a kill if it does not stop), and watches its workers: one that dies without reporting how
its run ended leaves the run "failed", with its records kept and the server untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bncore.status import RunStatus
from server import keys
from server.executors import executor_for
from server.settings import Settings
from server.store import Store

log = logging.getLogger(__name__)
POLL = 0.1  # seconds between looks at the queue and the workers
KILL_AFTER = 5.0  # seconds a cancelled worker gets to stop by itself


@dataclass
class _Worker:
    process: Any  # a process, or what stands for one (server.executors)
    cancel: Any  # its cancel flag (set())
    cancelled_at: float | None = None
    slots: int = 1  # processes it trains with (a distributed run's replicas)
    hung: str | None = None  # why it was killed as hung (kill_hung)


class Scheduler:
    def __init__(self, store: Store, settings: Settings, on_status: Callable[[str], None]) -> None:
        self.store, self.settings, self.on_status = store, settings, on_status
        self.queue: deque[str] = deque()
        self.running: dict[str, _Worker] = {}
        self.executor = executor_for(settings.executor, settings.ray_address, settings.worker_start)
        self._task: asyncio.Task[None] | None = None
        self.api_url = settings.public_url

    def start(self, api_url: str) -> None:
        self.api_url = self.settings.public_url or api_url
        self.queue.extend(self.store.runs.recover())
        self.executor.prepare()  # workers ready before the first launch (server.executors)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for run_id, w in list(self.running.items()):
            if self.store.finish_run(
                run_id,
                RunStatus.INTERRUPTED.value,
                message="the server shut down while this run was training; its records are kept",
            ):
                self.on_status(run_id)
            w.cancel.set()
        deadline = time.monotonic() + KILL_AFTER
        for run_id, w in list(self.running.items()):
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
            self._reap(run_id, w)
        self.executor.close()

    def submit(self, run_id: str) -> None:
        self.queue.append(run_id)

    def position(self, run_id: str) -> int | None:
        """Place in the queue (0: next), None if not queued."""
        try:
            return self.queue.index(run_id)
        except ValueError:
            return None

    def queued_for(self, run_id: str) -> str | None:
        """What a queued run waits for: "workers" while the executor gets its workers ready
        (the server's first seconds: a fork server importing torch), else "slot" (a free
        worker); None if not queued."""
        if run_id not in self.queue:
            return None
        return "slot" if self.executor.ready() else "workers"

    def cancel(self, run_id: str) -> bool:
        """Cancel a queued or running run; False if it is neither."""
        if run_id in self.queue:
            self.queue.remove(run_id)
            message = "cancelled before it started"
            if self.store.finish_run(run_id, RunStatus.CANCELLED.value, message=message):
                self.on_status(run_id)
            return True
        w = self.running.get(run_id)
        if w is None:
            return False
        w.cancel.set()
        w.cancelled_at = w.cancelled_at or time.monotonic()
        return True

    @property
    def heartbeat_s(self) -> float:
        """How often a worker says it is alive: four times within ``--worker-timeout``."""
        return self.settings.worker_timeout / 4

    def kill_hung(self, run_id: str, why: str) -> None:
        """Kill a worker taken for hung (no heartbeat in ``--worker-timeout``): its run ends
        failed, saying ``why``, with its records; its slot frees at the next look."""
        w = self.running.get(run_id)
        if w is not None and w.hung is None:
            w.hung = why
            log.warning("run %s: %s", run_id, why)
            w.process.kill()

    def worker_pid(self, run_id: str) -> int | None:
        w = self.running.get(run_id)
        return w.process.pid if w is not None else None

    async def _loop(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # the scheduler must outlive any one run's trouble
                log.exception("scheduler tick failed")
            await asyncio.sleep(POLL)

    def _tick(self) -> None:
        for run_id, w in list(self.running.items()):
            if not w.process.is_alive():
                self._reap(run_id, w)
            elif w.cancelled_at and time.monotonic() - w.cancelled_at > KILL_AFTER:
                w.process.kill()
        # a distributed run takes a slot per replica; one larger than max_runs runs alone; none
        # starts while the executor gets its workers ready (seconds, once)
        while self.queue and self.executor.ready():
            need = self._slots(self.queue[0])
            used = sum(w.slots for w in self.running.values())
            if self.running and used + need > self.settings.max_runs:
                break
            self._launch(self.queue.popleft(), need)

    def _slots(self, run_id: str) -> int:
        run = self.store.runs.get(run_id)
        replicas = ((run or {}).get("config") or {}).get("distributed", {}).get("replicas", 1)
        return max(1, int(replicas or 1))

    def _launch(self, run_id: str, slots: int = 1) -> None:
        run = self.store.runs.get(run_id)
        if run is None or run["status"] != RunStatus.QUEUED.value:
            return
        config_json = json.dumps(run["config"])
        token, key = keys.mint()  # for this worker only: a worker of before a restart is locked out
        threads = self.settings.threads_per_run()
        args = (run_id, config_json, self.api_url, self.settings.token, threads,
                str(self.settings.dataset_root), token, self.heartbeat_s)  # fmt: skip
        gpus = slots if (run["config"] or {}).get("device") == "cuda" else 0
        self.store.runs.update(run_id, write_key=key)
        process, cancel = self.executor.start(args, threads * slots, gpus, f"bnscope-run-{run_id}")
        self.running[run_id] = _Worker(process, cancel, slots=slots)
        self.store.runs.update(run_id, pid=process.pid)

    def _reap(self, run_id: str, w: _Worker) -> None:
        self.running.pop(run_id, None)
        code = w.process.exitcode
        if w.hung is not None:
            status, message = RunStatus.FAILED.value, w.hung
        elif w.cancelled_at is not None:
            status, message = RunStatus.CANCELLED.value, "cancelled while training"
        else:
            status = RunStatus.FAILED.value
            message = f"the worker process ended with exit code {code} before reporting a result"
            if code is not None and code < 0:
                message = f"the worker process was killed (signal {-code})"
        if self.store.finish_run(run_id, status, message=message):
            self.on_status(run_id)

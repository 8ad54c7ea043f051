"""Where a run's worker trains: a process of this machine (the default), or a Ray task on a
cluster (``--executor ray --ray-address ADDR``). Either way the worker is server.worker's
``main``, reporting through the same HTTP ingest API; the scheduler sees a handle with the
process API it needs (``is_alive``, ``join``, ``kill``, ``exitcode``, ``pid``) and a cancel flag
with ``set``.

A local worker is a fork of a process that has already imported torch and bncore (a fork
server, started and warmed when the scheduler starts: :class:`LocalExecutor`): a fresh process
spent 2-7 s importing them before its first step, most of a launch's wait for its first point
(issue 28; benchmarks/dashboard_page.py measures it). ``--worker-start spawn`` starts each in a
fresh interpreter instead, as before; so does a platform without fork servers, or one that
failed, with a warning.

A Ray task asks for the run's resources: its threads times its replicas as CPUs, and a GPU per
replica for a CUDA run. Ray does not retry it: a worker that dies leaves its run failed, with
what it stored. Cancel asks Ray to interrupt the task (a KeyboardInterrupt in the worker, which
stops at once and keeps what it sent); a task still running after the grace is killed.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Literal, Protocol

__all__ = ["PRELOAD", "Executor", "LocalExecutor", "RayExecutor", "executor_for"]

log = logging.getLogger(__name__)

#: What the fork server imports once, ahead of any launch, so that no worker imports it again:
#: torch, torch._dynamo (a process's first optimizer imports it: 1-5 s) and
#: torch.utils.cpp_extension (the fused kernel's build flags: 0.1-0.2 s), bncore's training
#: (config, data, replicas, loop), the worker itself, and the makers of the made datasets
#: (scikit-learn's digits, MNIST-1D: about 1 s each). One that cannot be imported is skipped
#: (multiprocessing's forkserver ignores an ImportError); none of them initialises CUDA (checked
#: by :func:`_first_child` before the first launch), which a fork could not carry over.
PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.utils.cpp_extension",
    "bncore.run.config",
    "bncore.run.data",
    "bncore.run.distributed",
    "bncore.run.engine",
    "server.worker",
    "sklearn.datasets",
    "mnist1d.data",
]
#: Seconds the fork server may take to import PRELOAD (and, on a new machine, its first child to
#: build the fused kernel: 30-40 s on 2 cores) before launches stop waiting for it and start by
#: spawn (a loaded machine imports torch in 6 s, ten times an idle one).
WARM_TIMEOUT = 120.0


class Handle(Protocol):
    pid: int | None

    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...
    def kill(self) -> None: ...
    @property
    def exitcode(self) -> int | None: ...


class Executor(Protocol):
    def prepare(self) -> None:
        """Get ready for launches, in the background (called as the scheduler starts)."""
        ...

    def ready(self) -> bool:
        """Whether a launch may start now (False while workers are being made ready)."""
        ...

    def start(self, args: tuple[Any, ...], cpus: int, gpus: int, name: str) -> tuple[Any, Any]:
        """Start ``server.worker.main(*args[:5], cancel, *args[5:])``; (handle, cancel flag)."""
        ...

    def close(self) -> None: ...


def _first_child() -> None:
    """The fork server's first child: it has PRELOAD imported, and CUDA uninitialised (a CUDA
    context does not survive a fork: a worker would fail at its first CUDA call). It builds
    bncore's fused CPU kernel where this machine has none yet (once per machine, about 30 s on
    2 cores; bncore.nn.kernels.cpu caches it): the first run then starts with it loaded at
    once, while runs queued meanwhile say that the workers are starting, not that the run's own
    worker had started and was silent."""
    torch = sys.modules.get("torch")
    if torch is None:
        raise SystemExit("torch was not preloaded")
    if torch.cuda.is_initialized():
        raise SystemExit("the fork server initialised CUDA")
    from bncore.nn.kernels import cpu

    cpu.load()  # False, with a warning, where it cannot be built: runs use the reference


class LocalExecutor:
    """Each run in a process of its own on this machine (multiprocessing).

    ``start="preloaded"`` (the default): each worker is forked from a fork server that imported
    :data:`PRELOAD` once, so its first step comes about a second after the launch instead of
    after several seconds of imports. :meth:`prepare` starts that server in the background;
    :meth:`ready` says when launches may go (the scheduler keeps runs queued until then, at most
    :data:`WARM_TIMEOUT`: a fresh spawn meanwhile would compete with it for the cores and start
    later). Where the fork server is not to be had, or fails, workers are spawned, with a
    warning in the log: a run never fails for it. ``start="spawn"``: each worker a fresh
    interpreter (``--worker-start spawn``; the benchmark's baseline).

    A forked worker's parent is the fork server, not the server: it watches the server itself
    (server.worker.watch_parent). It sets its own torch threads and CPU priority after the fork
    (server.worker.main); a distributed run's other replicas are fresh processes of its own
    (bncore.run.distributed)."""

    def __init__(self, start: Literal["preloaded", "spawn"] = "preloaded") -> None:
        self._spawn = mp.get_context("spawn")
        self._forkserver: Any = None  # the fork server's context, once it is warm
        self._preload = start == "preloaded"
        self._warm_by: float | None = None  # once prepared: when launches stop waiting for it
        self._warmed = threading.Event()  # warm, failed, or waited for long enough

    def prepare(self) -> None:
        """Start the fork server and have it import PRELOAD, in the background (the server's
        startup does not wait for it)."""
        if not self._preload or self._warm_by is not None:
            return
        self._warm_by = time.monotonic() + WARM_TIMEOUT
        threading.Thread(target=self._warm, name="bnscope-forkserver", daemon=True).start()

    def _warm(self) -> None:
        try:
            ctx = mp.get_context("forkserver")  # ValueError on a platform without it
            ctx.set_forkserver_preload(PRELOAD)
            probe = ctx.Process(target=_first_child, name="bnscope-warm-up", daemon=True)
            probe.start()  # returns once the fork server has imported PRELOAD and forked
            probe.join(WARM_TIMEOUT)
            if probe.exitcode != 0:
                raise RuntimeError(f"its first child ended with exit code {probe.exitcode}")
            self._forkserver = ctx
        except Exception as exc:
            log.warning("workers start by spawn (each imports torch: seconds more per launch): "
                        "no fork server (%s)", exc)  # fmt: skip
        finally:
            self._warmed.set()

    def ready(self) -> bool:
        """Whether a launch may start now (see the class; never prepared: at once, by spawn)."""
        if self._warm_by is None or self._warmed.is_set():
            return True
        if time.monotonic() < self._warm_by:
            return False
        log.warning("the fork server has not imported torch in %.0f s: workers start by spawn "
                    "until it has", WARM_TIMEOUT)  # fmt: skip
        self._warmed.set()
        return True

    def start(self, args: tuple[Any, ...], cpus: int, gpus: int, name: str) -> tuple[Any, Any]:
        from server import worker

        for ctx in (self._forkserver, self._spawn):
            if ctx is None:
                continue
            cancel = ctx.Event()
            process = ctx.Process(
                target=worker.main, name=name, daemon=True, args=(*args[:5], cancel, *args[5:])
            )
            try:
                process.start()
            except Exception as exc:  # the fork server died, and could not start again
                if ctx is self._spawn:
                    raise
                log.warning("%s: the fork server failed (%s); spawning its worker", name, exc)
                continue
            return process, cancel
        raise AssertionError("unreachable: spawn either starts or raises")

    def close(self) -> None:
        """The fork server goes with the server (it would otherwise finish importing torch, a
        few seconds of a core, before it noticed)."""
        if self._warm_by is None:
            return
        from multiprocessing import forkserver

        pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class _NeverSet:
    """The cancel flag a Ray task checks: Ray interrupts the task itself (ray.cancel)."""

    def is_set(self) -> bool:
        return False


class _RayCancel:
    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def set(self) -> None:
        import ray

        ray.cancel(self.ref)  # a KeyboardInterrupt in the task: it stops where it is


class _RayTask:
    """A Ray task seen as a process."""

    pid: int | None = None

    def __init__(self, ref: Any) -> None:
        self.ref = ref
        self._code: int | None = None

    def is_alive(self) -> bool:
        import ray

        if self._code is not None:
            return False
        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return True
        try:
            ray.get(self.ref)
            self._code = 0
        except ray.exceptions.TaskCancelledError:
            self._code = 1
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError):
            self._code = -9  # the worker process died (killed, out of memory, lost node)
        except ray.exceptions.RayError:
            self._code = 1
        return False

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)

    @property
    def exitcode(self) -> int | None:
        return None if self.is_alive() else self._code


class RayExecutor:
    """Each run a Ray task on the cluster at ``address`` (None: a cluster of this machine)."""

    def __init__(self, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError(
                "--executor ray needs Ray: pip install 'bnscope[ray]' (or ray) on the server "
                "and on every machine of the cluster"
            ) from None
        if address and address != "auto":
            _reachable(address)  # ray.init would retry for minutes
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)  # fmt: skip
        from server import worker

        # a fresh process per run (as the local executor has): no state left from the last
        self._remote = ray.remote(max_retries=0, max_calls=1)(worker.main)

    def start(self, args: tuple[Any, ...], cpus: int, gpus: int, name: str) -> tuple[Any, Any]:
        ref = self._remote.options(num_cpus=cpus, num_gpus=gpus, name=name).remote(
            *args[:5], _NeverSet(), *args[5:]
        )
        return _RayTask(ref), _RayCancel(ref)

    def prepare(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        import ray

        ray.shutdown()


def _reachable(address: str, timeout: float = 5.0) -> None:
    """ConnectionError unless something listens at ``host:port``."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc})") from None


def executor_for(
    kind: str, ray_address: str | None, worker_start: Literal["preloaded", "spawn"] = "preloaded"
) -> LocalExecutor | RayExecutor:
    """The executor ``--executor`` names (a local one starting workers as ``--worker-start``
    says)."""
    return RayExecutor(ray_address) if kind == "ray" else LocalExecutor(worker_start)

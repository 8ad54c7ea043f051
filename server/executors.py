"""Where a run's worker trains: a process of this machine (the default), or a Ray task on a
cluster (``--executor ray --ray-address ADDR``). Either way the worker is server.worker's
``main``, reporting through the same HTTP ingest API; the scheduler sees a handle with the
process API it needs (``is_alive``, ``join``, ``kill``, ``exitcode``, ``pid``) and a cancel flag
with ``set``.

A Ray task asks for the run's resources: its threads times its replicas as CPUs, and a GPU per
replica for a CUDA run. Ray does not retry it: a worker that dies leaves its run failed, with
what it stored. Cancel asks Ray to interrupt the task (a KeyboardInterrupt in the worker, which
stops at once and keeps what it sent); a task still running after the grace is killed.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from typing import Any, Protocol

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "executor_for"]


class Handle(Protocol):
    pid: int | None

    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...
    def kill(self) -> None: ...
    @property
    def exitcode(self) -> int | None: ...


class Executor(Protocol):
    def start(self, args: tuple[Any, ...], cpus: int, gpus: int, name: str) -> tuple[Any, Any]:
        """Start ``server.worker.main(*args[:5], cancel, *args[5:])``; (handle, cancel flag)."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Each run in a process of its own on this machine (multiprocessing, spawn)."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")

    def start(self, args: tuple[Any, ...], cpus: int, gpus: int, name: str) -> tuple[Any, Any]:
        from server import worker

        cancel = self._ctx.Event()
        process = self._ctx.Process(
            target=worker.main, name=name, daemon=True, args=(*args[:5], cancel, *args[5:])
        )
        process.start()
        return process, cancel

    def close(self) -> None:
        pass


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


def executor_for(kind: str, ray_address: str | None) -> LocalExecutor | RayExecutor:
    """The executor ``--executor`` names."""
    return RayExecutor(ray_address) if kind == "ray" else LocalExecutor()

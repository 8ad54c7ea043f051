"""One run over several processes: data-parallel training with torch.distributed, each replica on
its share of every batch.

:func:`train_replicas` starts the replicas (this process is rank 0, the others are spawned),
over gloo on the CPU or NCCL with a GPU each. Every replica runs the same
:class:`~bncore.run.engine.Trainer` loop in lockstep, its place among the others kept by a
:class:`~bncore.run.replicas.Replicas`. With ``distributed.sync_bn`` every BN normalizes with the
global batch (bncore.nn.sync); without, each with its own, as DistributedDataParallel does by
default. Only rank 0 writes records.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from bncore.record.sinks import Sink
from bncore.run.engine import RunResult, Trainer, resolve_device
from bncore.run.replicas import Replicas

if TYPE_CHECKING:
    from bncore.run.config import RunConfig

__all__ = ["NullSink", "free_port", "train_replicas"]

#: How long a replica waits on the others before the run fails (a replica that died).
TIMEOUT = datetime.timedelta(seconds=120)


class NullSink:
    """Where a replica other than rank 0 writes: nowhere (rank 0 reports the run)."""

    def start(self, meta: dict[str, Any]) -> None:
        pass

    def write(self, records: Any) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, world: int, port: int, cuda: bool) -> torch.device:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=TIMEOUT
    )
    if cuda:
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _replica(
    rank: int, world: int, port: int, cuda: bool, data_root: str | None, flush_every: int
) -> None:
    """A replica other than rank 0, in a process of its own (``python -m bncore.run.distributed``):
    its config comes on stdin; it ends when the run does, or when rank 0's process is gone."""
    from bncore.run.config import RunConfig
    from bncore.run.data import load_dataset

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)  # rank 0 is gone: nobody to train with

    threading.Thread(target=watch, daemon=True).start()
    config = RunConfig.model_validate_json(sys.stdin.read())
    device = _init(rank, world, port, cuda)
    try:
        trainer = Trainer(config, load_dataset(config.data, data_root), Replicas(rank, world),
                          device=device)  # fmt: skip
        trainer.run(NullSink(), flush_every=flush_every)  # rank 0's: flushes are collective
    finally:
        dist.destroy_process_group()


def train_replicas(
    config: RunConfig,
    sink: Sink,
    data_root: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    flush_every: int = 50,
    **run: Any,
) -> RunResult:
    """Train ``config`` over ``config.distributed.replicas`` processes: this one is rank 0 and
    writes to ``sink``; the others are started here (as ``python -m bncore.run.distributed``, so a
    daemon process such as a server's worker can start them) and end with the run. A replica
    that fails fails the run (within :data:`TIMEOUT`)."""
    from bncore.run.data import load_dataset

    world = config.distributed.replicas
    cuda = resolve_device(config.device).type == "cuda"
    if cuda and torch.cuda.device_count() < world:
        raise ValueError(
            f"distributed.replicas={world} on CUDA needs a GPU per replica; this machine has "
            f"{torch.cuda.device_count()}"
        )
    port = free_port()
    threads = max(1, torch.get_num_threads() // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with contextlib.ExitStack() as stack:
        # what a failing replica says goes into the run's message
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(1, world)]
        helpers: list[subprocess.Popen] = []
        for r, log in enumerate(logs, 1):
            argv = [sys.executable, "-m", "bncore.run.distributed", str(r), str(world), str(port),
                    "cuda" if cuda else "cpu", str(flush_every), data_root or ""]  # fmt: skip
            h = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=log, env=env)
            assert h.stdin is not None
            h.stdin.write(config.model_dump_json().encode())
            h.stdin.close()
            helpers.append(h)
        torch.set_num_threads(threads)
        try:
            device = _init(0, world, port, cuda)
            try:
                trainer = Trainer(config, load_dataset(config.data, data_root),
                                  Replicas(0, world), device=device)  # fmt: skip
                result = trainer.run(sink, should_stop, flush_every=flush_every, **run)
                # the replicas end before this rank's group goes: a connection closed under a
                # replica's last receive aborted it (exit -6, "terminate called without an
                # active exception"), seen on a cancelled run under load
                _wait(helpers)
            finally:
                dist.destroy_process_group()
        except BaseException:  # rank 0 failed: the others would wait on it until TIMEOUT
            for h in helpers:
                h.kill()
            raise
        finally:
            _wait(helpers)
        for h, log in zip(helpers, logs, strict=True):
            if h.returncode:
                log.seek(0)
                said = log.read().decode(errors="replace").strip().splitlines()[-12:]
                raise RuntimeError(
                    f"a replica ended with exit code {h.returncode}: " + "\n".join(said)
                )
        return result


def _wait(helpers: list[subprocess.Popen]) -> None:
    """Each replica's process ended (killed after :data:`TIMEOUT`)."""
    for h in helpers:
        try:
            h.wait(timeout=TIMEOUT.total_seconds())
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()


if __name__ == "__main__":
    _rank, _world, _port, _device, _flush, _root = sys.argv[1:7]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _replica(int(_rank), int(_world), int(_port), _device == "cuda", _root or None, int(_flush))

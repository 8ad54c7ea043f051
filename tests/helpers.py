"""Small helpers shared by the tests (a test module imports these, never another test module)."""

from __future__ import annotations

import copy
import os
import pickle
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bncore.run.config import RunConfig, parse_config
from bncore.run.distributed import free_port
from bncore.status import FINISHED

__all__ = [
    "FINAL",
    "Touch",
    "channel_dims",
    "closed_url",
    "free_port",
    "gone",
    "on_ranks",
    "small_config",
    "tiny_run",
    "write_cifar",
]

#: A run's final statuses: one that has any of these trains no more.
FINAL = set(FINISHED)


def tiny_run(**over: Any) -> dict[str, Any]:
    """A run config (as the API takes it) that trains in a few seconds; ``over`` replaces
    whole top-level fields."""
    cfg: dict[str, Any] = {
        "steps": 120,
        "model": {"depth": 2, "width": 16},
        "data": {"name": "digits"},
        "eval_interval": 40,
        "batch_size": 32,
    }
    cfg.update(over)
    return cfg


SMALL = {
    "model": {"depth": 3, "width": 24},
    "data": {"name": "digits"},
    "batch_size": 32,
    "eval_interval": 20,
    "optim": {"lr": 0.05},
}


def closed_url() -> str:
    """An address of 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has: this machine's init may never reap the
    orphans it is handed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def small_config(**over: Any) -> RunConfig:
    """A small MLP on digits, parsed; a dict in ``over`` updates that section, anything else
    replaces the field."""
    data = copy.deepcopy(SMALL)
    for k, v in over.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return parse_config(data)


def on_ranks(
    check: Callable[[int], None], out: Path, backend: str = "gloo", world: int = 2
) -> None:
    """``check(rank)`` in ``world`` processes of one torch.distributed group on 127.0.0.1
    (``check`` picklable: a module's function, or a partial of one); fails with the first
    failing rank's traceback."""
    mp.spawn(_rank, args=(check, free_port(), str(out), backend, world), nprocs=world, join=True)
    errors = [p.read_text() for p in out.glob("error*")]
    assert not errors, errors[0]
    assert sorted(p.name for p in out.glob("ok*")) == [f"ok{r}" for r in range(world)]


def _rank(rank: int, check: Callable[[int], None], port: int, out: str, backend: str,
          world: int) -> None:  # fmt: skip
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=rank, world_size=world)
        check(rank)
        dist.barrier()
        Path(out, f"ok{rank}").write_text("ok")
    except Exception:
        Path(out, f"error{rank}").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def channel_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel one: what BN reduces over."""
    return [d for d in range(x.dim()) if d != 1]


def write_cifar(folder: Path, sizes=(("data_batch_1", 20), ("test_batch", 8)), protocol=None):
    """A tiny CIFAR-10 python-version dataset, in the real layout (a pickled dict per batch)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, n in sizes:
        batch = {
            b"batch_label": b"training batch 1 of 5",
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return folder


class Touch:
    """Unpickling this with plain pickle creates ``marker``: the shape of a code-execution
    payload (any callable could stand where ``open`` does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def check_cuda_kernel_choice(x: Any, w: Any, b: Any, monkeypatch: Any) -> None:
    """On CUDA input the compiled kernel runs; the reference only once compiling has failed or
    when forced; the fused CPU kernel never (tests/bncore/nn/test_cuda.py on a GPU,
    tests/bncore/nn/test_kernels.py with fake CUDA tensors)."""
    from bncore.nn import kernels
    from bncore.nn.kernels import compiled, reference

    monkeypatch.setattr(compiled, "available", lambda: True)
    assert kernels.select(x, None, None) is compiled
    assert kernels.select(x, w, b) is compiled
    with kernels.use("compiled"):
        assert kernels.select(x, w, b) is compiled
    for forced in ("reference", "cpu"):  # the CPU kernel cannot take it: the reference does
        with kernels.use(forced):
            assert kernels.select(x, w, b) is reference, forced
    monkeypatch.setattr(compiled, "available", lambda: False)  # compiling failed
    assert kernels.select(x, w, b) is reference

"""Small helpers shared by the tests (a test module imports these, never another test module)."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bncore.record.tables import Records, channel_widths
from bncore.record.watcher import Watcher
from bncore.run.config import RunConfig, parse_config
from bncore.run.distributed import free_port
from bncore.status import FINISHED

__all__ = [
    "FINAL",
    "Touch",
    "batches",
    "bn_inputs",
    "channel_dims",
    "closed_url",
    "free_port",
    "gone",
    "on_ranks",
    "one_thread",
    "small_config",
    "tiny_run",
    "train",
    "trains_exactly_as_unwatched",
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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a while. On a shared 2-core machine, torch's two threads
    spin-wait for each other while another process holds a core: small conv nets then train
    10-50 times slower (timm's and torchvision's of tests/bncore/record/test_watch_models.py:
    2-40 s against 0.5-2.5 s each, measured side by side)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Training a model watched and unwatched (bncore.record.watcher on the networks people train:
# tests/bncore/record/test_watch.py, test_watch_models.py)


def batches(steps: int, n: int = 8, shape=(3, 32, 32), classes: int = 10, dtype=torch.float32,
            target=()) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """``steps`` seeded batches of ``n`` inputs of ``shape`` and class targets (of shape
    ``target`` each: a segmentation's per-pixel classes)."""
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(n, *shape, generator=g, dtype=dtype),
            torch.randint(0, classes, (n, *target), generator=g),
        )
        for _ in range(steps)
    ]


def bn_inputs(model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list]:
    """The user's own forward hooks: each BN layer's batch mean and biased variance."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):

            def hook(mod, args, out, name=name):
                if mod.training:
                    x = args[0].detach().double()
                    dims = [d for d in range(x.dim()) if d != 1]
                    seen[name] = (x.mean(dims), x.var(dims, unbiased=False))

            handles.append(m.register_forward_hook(hook))
    return seen, handles


def _itself(out: Any) -> torch.Tensor:
    return out


def train(model: nn.Module, data, watch: bool, channels_last: bool = False,
          output: Callable[[Any], torch.Tensor] = _itself, **kw: Any):  # fmt: skip
    """SGD with momentum over ``data`` (cross-entropy on ``output(model(x))``: the logits); the
    optimizer is made *before* watch(), as most scripts do. Returns the losses (and the
    watcher)."""
    torch.manual_seed(3)  # dropout and stochastic depth draw the same numbers both times
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    watcher = Watcher(model, **kw) if watch else None
    losses = []
    for step, (x, y) in enumerate(data, 1):
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        loss = F.cross_entropy(output(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if watcher is not None:
            watcher.log(step)
    return losses, watcher


def trains_exactly_as_unwatched(
    make: Callable[[], nn.Module],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    channels_last: bool = False,
    output: Callable[[Any], torch.Tensor] = _itself,
) -> tuple[Records, dict[str, Any]]:
    """``make()`` (seeded) trained over ``data`` and a deep copy of it trained watched: the
    losses are bit for bit the same; the watched model is as it was (its modules' classes, its
    Parameters, its state_dict keys); every batch norm module in it is recorded, with the batch
    mean and variance the user's own forward hooks see (the last step's, per channel and per
    layer); in eval mode it gives what the unwatched one gives, and so does a fresh ``make()``
    loading its state_dict. Returns its records and the watcher's meta."""
    torch.manual_seed(0)
    plain = make()
    watched = copy.deepcopy(plain)
    classes = {id(m): type(m) for m in watched.modules()}
    params = [id(p) for p in watched.parameters()]
    keys = list(watched.state_dict())
    steps = len(data)

    expected, _ = train(plain, data, watch=False, channels_last=channels_last, output=output)
    seen, _ = bn_inputs(watched)
    got, w = train(watched, data, watch=True, channels_last=channels_last, output=output,
                   channel_interval=1)  # fmt: skip
    assert got == expected  # bit for bit, in float32: the very same kernels ran
    # the model is as it was: same classes, Parameters, state_dict keys
    assert {id(m): type(m) for m in watched.modules()} == classes
    assert [id(p) for p in watched.parameters()] == params
    assert list(watched.state_dict()) == keys

    bn_names = [n for n, m in watched.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # fmt: skip
    assert bn_names and sorted(w.layers) == sorted(bn_names)
    rec = w.flush()
    assert set(rec.layers["layer"].tolist()) == set(bn_names)
    last = rec.channels["step"] == steps
    assert sorted(rec.channels["layer"][last].tolist()) == sorted(bn_names)
    for name, mean, var in zip(rec.channels["layer"][last], rec.channels["pre_mean"][last],
                               rec.channels["pre_var"][last], strict=True):  # fmt: skip
        ref_mean, ref_var = seen[name]
        np.testing.assert_allclose(mean, ref_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, ref_var.numpy(), rtol=1e-4, atol=1e-6)
    summary = rec.layers["step"] == steps
    for name, v in zip(rec.layers["layer"][summary], rec.layers["pre_var"][summary], strict=True):
        assert v == pytest.approx(seen[name][1].mean().item(), rel=1e-4, abs=1e-6)
    assert (channel_widths(rec.channels) > 0).all()
    meta = w.meta()
    w.close()

    plain.eval(), watched.eval()
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(output(plain(x)), output(watched(x)))
    fresh = make()
    fresh.load_state_dict(watched.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(output(fresh(x)), output(watched(x)))
    return rec, meta

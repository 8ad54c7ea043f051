"""What a run will cost, from its config alone, before it runs: the memory its worker needs at
the peak (parameters, gradients and optimizer state, the activations autograd keeps, the data)
and the bytes of records it leaves. A server refuses a run that would not fit before queueing
it, naming what to change. The limits on any run, wherever it trains (its parameters, the
per-channel values it keeps), are counted here too and are rules of every RunConfig
(:func:`within_limits`).

The model is built on PyTorch's ``meta`` device (shapes only, no storage) and run once on a
meta batch, so the count is the real network's, whatever its kind; the constants are measured
(peak RSS of real runs: ``benchmarks/budget.py``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from bncore.record.tables import CHANNEL_COLUMNS
from bncore.run.config import RUN_RULES, FieldsError, RunConfig
from bncore.statistics import columns

if TYPE_CHECKING:
    from bncore.run.models import Net

FLOAT = 4  # bytes of a float32
#: A worker with torch imported and nothing built yet (measured: 330-420 MB RSS).
BASE_MEMORY = 450 * 2**20
#: Tensors kept for the backward pass per module output, in float32 (autograd's saved inputs
#: and outputs, BN's normalized input, the probe's statistics): fitted, 1.2-1.9 measured.
KEPT_PER_OUTPUT = 2.0
#: Copies of a parameter beyond itself, its gradient and the optimizer's state: a linear
#: layer's weight norms and updates take about one more; a convolution's (oneDNN's reordered
#: weights, forward and backward) about nine, measured.
EXTRA_COPIES = {"linear": 1, "conv": 9}
#: The datasets known by name: one example's shape, classes, examples (train and test). Those
#: read from files are converted through float64 once (8 bytes a value while loading).
DATASETS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "mnist1d": ((1, 40), 10, 5000),
    "digits": ((1, 8, 8), 10, 1797),
    "mnist": ((1, 28, 28), 10, 70_000),
    "fashion_mnist": ((1, 28, 28), 10, 70_000),
    "cifar10": ((3, 32, 32), 10, 60_000),
}
#: Stored bytes of one recorded value of a series (an int64 step and a float32 value).
SERIES_VALUE = 12
#: The most parameters one run's network may have, on any machine.
MAX_PARAMETERS = 50_000_000
#: The most per-channel values one run may keep over its steps (2 GB as float32).
MAX_RECORDED_VALUES = 500_000_000


@dataclass(frozen=True)
class Estimate:
    """Peak memory and records of a run, in bytes, with the parts they are made of."""

    memory: int
    disk: int
    parameters: int
    parts: dict[str, int] = field(default_factory=dict)

    def memory_parts(self) -> str:
        return ", ".join(f"{k} {gigabytes(v)}" for k, v in self.parts.items())


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def example_shape(cfg: RunConfig) -> tuple[tuple[int, ...], int, int]:
    """(one example's shape, classes, examples in all) of the run's data."""
    d = cfg.data
    if d.name == "gaussian":
        return (d.features,), d.classes, d.samples
    return DATASETS.get(d.name, ((2,), d.classes, d.samples))  # blobs, spirals: 2-d points


def estimate(cfg: RunConfig) -> Estimate:
    """The run's peak memory and stored records (see the module docstring)."""
    shape, _, examples = example_shape(cfg)
    net = _network(_Key(cfg))
    states = 2 if cfg.optim.name == "adam" else (1 if cfg.optim.momentum else 0)
    copies = net.params * (2 + states + EXTRA_COPIES["linear"]) + net.conv * (
        EXTRA_COPIES["conv"] - EXTRA_COPIES["linear"]
    )
    per_example = math.prod(shape)
    data_bytes = examples * per_example * FLOAT
    if cfg.data.path is not None:  # read from files: a float64 copy while loading
        data_bytes += examples * per_example * 8
    # a distributed run: every replica a process of its own, with the model, its share of
    # the batch's activations and the data (the activations counted at the global batch)
    r = cfg.distributed.replicas
    parts = {
        "parameters, gradients and optimizer state": copies * FLOAT * r,
        "activations": int(_outputs(_Key(cfg)) * FLOAT * KEPT_PER_OUTPUT),
        "data": data_bytes * r,
        "the process": BASE_MEMORY * r,
    }
    return Estimate(sum(parts.values()), _records(cfg, net.channels), net.params, parts)


def within_limits(cfg: RunConfig) -> None:
    """The limits on one run wherever it trains, a rule of every RunConfig (``RUN_RULES``): its
    network's parameters, and the per-channel values it keeps; a FieldsError names the fields
    to change."""
    net = _network(_Key(cfg))
    if net.params > MAX_PARAMETERS:
        raise FieldsError(
            f"model.width={cfg.model.width} x model.depth={cfg.model.depth} gives "
            f"{net.params:,} parameters; the limit is {MAX_PARAMETERS:,}",
            "model.width",
            "model.depth",
        )
    values = _channel_values(cfg, net.channels)
    if values > MAX_RECORDED_VALUES:
        raise FieldsError(
            f"stats_interval={cfg.stats_interval} and channel_interval={cfg.channel_interval} "
            f"would keep about {values:,} per-channel values over {cfg.steps} steps; raise one "
            f"of them (limit {MAX_RECORDED_VALUES:,})",
            "stats_interval",
            "channel_interval",
        )


class _Key:
    """A config as the key of the network's counts: equal where the network is (what
    ``build_model`` reads: the model, its normalization, the data's shape, the batch size)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.json = cfg.model_dump_json(include={"model", "norm", "data", "batch_size"})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and other.json == self.json

    def __hash__(self) -> int:
        return hash(self.json)


@dataclass(frozen=True)
class _Net:
    params: int  # parameters in all
    conv: int  # of them, in convolutions
    channels: tuple[int, ...]  # of each block


def _build(cfg: RunConfig) -> Net:
    """The run's network on the meta device: shapes only, no storage."""
    from bncore.run.models import build_model  # the models import the norms, which import config

    shape, classes, _ = example_shape(cfg)
    with torch.device("meta"):
        return build_model(cfg, shape, classes)


@functools.lru_cache(maxsize=256)
def _network(key: _Key) -> _Net:
    """The network's parameters and channels, counted once: a sweep's points, and the configs
    validated again on their way to a worker, mostly share it."""
    model = _build(key.cfg)
    conv = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd)
        for p in m.parameters(recurse=False)
    )
    return _Net(
        params=sum(p.numel() for p in model.parameters()),
        conv=conv,
        channels=tuple(b.channels for _, b in model.blocks()),
    )


@functools.lru_cache(maxsize=256)
def _outputs(key: _Key) -> int:
    """Values the network's leaf modules output in one training forward of a batch."""
    shape, _, _ = example_shape(key.cfg)
    return _module_outputs(_build(key.cfg), (key.cfg.batch_size, *shape))


def _module_outputs(model: nn.Module, batch: tuple[int, ...]) -> int:
    """Values the leaf modules output in one training forward pass (meta tensors)."""
    total = 0

    def count(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        model.train()
        model(torch.empty(batch, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def _records(cfg: RunConfig, channels: tuple[int, ...]) -> int:
    """Bytes of records the run stores: every layer's statistics at every recorded step, and
    per-channel arrays every ``channel_interval`` recorded steps."""
    recorded = cfg.steps // cfg.stats_interval
    per_step = (len(columns("steps")) + len(channels) * len(columns("layers"))) * SERIES_VALUE
    evals = cfg.steps // cfg.eval_interval * len(columns("evals")) * SERIES_VALUE
    return recorded * per_step + _channel_values(cfg, channels) * FLOAT + evals


def _channel_values(cfg: RunConfig, channels: tuple[int, ...]) -> int:
    """Per-channel values the run keeps: each channel's columns (CHANNEL_COLUMNS) every
    ``channel_interval`` recorded steps."""
    kept = cfg.steps // cfg.stats_interval // cfg.channel_interval
    return kept * sum(channels) * len(CHANNEL_COLUMNS)


RUN_RULES.append(within_limits)

"""Networks built from a RunConfig: the same named positions with and without normalization.

A network is ``block0 .. block{depth-1}`` then ``head``. Each :class:`Block` is a linear (MLP) or
convolutional (CNN) layer, a normalization and an activation, in the configured order; without
normalization the ``norm`` slot is an identity, so runs compare block by block. On the steps a
:class:`Probe` is attached, a block hands it the tensors at its positions:

- ``pre_norm`` / ``post_norm``: what enters and leaves the normalization;
- ``pre_act`` / ``post_act``: what enters and leaves the activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor, nn

from bncore.batchnorm import BatchNorm1d, BatchNorm2d
from bncore.config import ModelConfig, NormConfig, RunConfig
from bncore.norms import BatchRenorm, GhostBatchNorm, NoisyBatchNorm

__all__ = ["ACTIVATIONS", "NORMS", "Block", "Layer", "Net", "Probe", "build_model"]

#: A block's linear or convolutional layer.
Layer = nn.Linear | nn.Conv1d | nn.Conv2d


class Probe(Protocol):
    """Whoever watches a block on the steps it records (bncore.probes.Recorder)."""

    def observe(
        self, block: Block, pre_norm: Tensor, post_norm: Tensor, pre_act: Tensor, post_act: Tensor
    ) -> None: ...


NormBuilder = Callable[[RunConfig, int, int], nn.Module]


def _batch_norm(cfg: NormConfig, channels: int, spatial_dims: int) -> BatchNorm1d | BatchNorm2d:
    cls = BatchNorm2d if spatial_dims == 2 else BatchNorm1d
    momentum, eps = cfg.resolved()
    if cfg.convention == "keras":
        assert momentum is not None
        return cls.from_keras(channels, momentum=1.0 - momentum, epsilon=eps)
    return cls(channels, eps=eps, momentum=momentum)


def _bn_args(cfg: NormConfig) -> dict[str, Any]:
    momentum, eps = cfg.resolved()
    return {"eps": eps, "momentum": momentum, "unbiased_running_var": cfg.convention != "keras"}


#: Normalization layers by NormConfig.kind: (run config, channels, spatial dims) -> module.
NORMS: dict[str, NormBuilder] = {
    "none": lambda cfg, channels, dims: nn.Identity(),
    "batch": lambda cfg, channels, dims: _batch_norm(cfg.norm, channels, dims),
    "ghost": lambda cfg, channels, dims: GhostBatchNorm(
        channels, cfg.norm.resolved_virtual_batch(cfg.batch_size), **_bn_args(cfg.norm)
    ),
    "renorm": lambda cfg, channels, dims: BatchRenorm(
        channels, cfg.norm.r_max, cfg.norm.d_max, **_bn_args(cfg.norm)
    ),
    "noisy": lambda cfg, channels, dims: NoisyBatchNorm(
        _batch_norm(cfg.norm, channels, dims), cfg.norm.noise_shift, cfg.norm.noise_scale
    ),
    "group": lambda cfg, channels, dims: nn.GroupNorm(
        cfg.norm.resolved_groups(channels), channels, eps=cfg.norm.resolved()[1]
    ),
    "layer": lambda cfg, channels, dims: nn.GroupNorm(1, channels, eps=cfg.norm.resolved()[1]),
}

#: Activation modules by ModelConfig.activation.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
}


class Block(nn.Module):
    """layer -> norm -> activation (``before_activation``) or layer -> activation -> norm."""

    def __init__(self, layer: Layer, norm: nn.Module, act: nn.Module, norm_first: bool):
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act
        self.norm_first = norm_first
        self.probe: Probe | None = None

    @property
    def channels(self) -> int:
        layer = self.layer
        return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer(x)
        if self.norm_first:
            n = self.norm(z)
            a = self.act(n)
            pre_norm, post_norm, pre_act, post_act, out = z, n, n, a, a
        else:
            a = self.act(z)
            n = self.norm(a)
            pre_norm, post_norm, pre_act, post_act, out = a, n, z, a, n
        if self.probe is not None:
            self.probe.observe(self, pre_norm, post_norm, pre_act, post_act)
        return out


class Net(nn.Module):
    """Named blocks, then a classifier head."""

    def __init__(self, blocks: list[Block], head: nn.Module, flatten_input: bool):
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(f"block{i}", block)
        self.head = head
        self.flatten_input = flatten_input
        self.block_names = [f"block{i}" for i in range(len(blocks))]

    def blocks(self) -> list[tuple[str, Block]]:
        """(name, block) in order."""
        return [(name, getattr(self, name)) for name in self.block_names]

    def forward(self, x: Tensor) -> Tensor:
        if self.flatten_input:
            x = x.flatten(1)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.head(x)


def _bias(model: ModelConfig, norm: NormConfig) -> bool:
    if model.bias is not None:
        return model.bias
    return not (norm.kind != "none" and norm.placement == "before_activation")


def build_model(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> Net:
    """The network ``cfg`` describes, for inputs of ``input_shape`` (one example's shape)."""
    m, norm = cfg.model, cfg.norm
    bias, norm_first = _bias(m, norm), norm.placement == "before_activation"
    blocks: list[Block] = []
    if m.kind == "mlp":
        fan_in = math.prod(input_shape)
        for _ in range(m.depth):
            blocks.append(
                Block(
                    nn.Linear(fan_in, m.width, bias=bias),
                    NORMS[norm.kind](cfg, m.width, 0),
                    ACTIVATIONS[m.activation](),
                    norm_first,
                )
            )
            fan_in = m.width
        return Net(blocks, nn.Linear(fan_in, num_classes), flatten_input=True)
    spatial = len(input_shape) - 1
    if spatial not in (1, 2):
        raise ValueError(f"model.kind='cnn' needs (C, L) or (C, H, W) inputs, got {input_shape}")
    conv = nn.Conv1d if spatial == 1 else nn.Conv2d
    channels, size = input_shape[0], min(input_shape[1:])
    for i in range(m.depth):
        stride = 2 if i % 2 == 1 and size >= 8 else 1  # halve the resolution every other block
        size = (size + 1) // stride if stride == 2 else size
        blocks.append(
            Block(
                conv(channels, m.width, 3, stride=stride, padding=1, bias=bias),
                NORMS[norm.kind](cfg, m.width, spatial),
                ACTIVATIONS[m.activation](),
                norm_first,
            )
        )
        channels = m.width
    pool = nn.AdaptiveAvgPool1d(1) if spatial == 1 else nn.AdaptiveAvgPool2d(1)
    head = nn.Sequential(pool, nn.Flatten(), nn.Linear(channels, num_classes))
    return Net(blocks, head, flatten_input=False)

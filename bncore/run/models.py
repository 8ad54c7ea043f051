"""Networks built from a RunConfig: the same named positions with and without normalization.

A plain network (``mlp``, ``cnn``) is ``block0 .. block{depth-1}`` then ``head``. Each
:class:`Block` is a linear or convolutional layer, a normalization and an activation, in the
configured order; without normalization the ``norm`` slot is an identity, so runs compare block
by block. A residual network (``resnet``, :class:`ResNet`) is a stem block, then residual blocks
``res{k}`` whose branches are two blocks each, ``res{k}.a`` and ``res{k}.b`` (and, with projection
shortcuts, a stage's first block has a third, its shortcut ``res{k}.shortcut``). On the steps a
:class:`Probe` is attached, a block hands it the tensors at its positions:

- ``pre_norm`` / ``post_norm``: what enters and leaves the normalization;
- ``pre_act`` / ``post_act``: what enters and leaves the activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bncore.nn.batchnorm import BatchNorm1d, BatchNorm2d
from bncore.nn.norms import BatchRenorm, GhostBatchNorm, NoisyBatchNorm
from bncore.run.config import ModelConfig, NormConfig, RunConfig

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "ORDERS",
    "Block",
    "Layer",
    "Net",
    "Probe",
    "ResNet",
    "ResidualBlock",
    "Shortcut",
    "build_model",
]

#: A block's linear or convolutional layer.
Layer = nn.Linear | nn.Conv1d | nn.Conv2d


class Probe(Protocol):
    """Whoever watches a block on the steps it records (bncore.record.recorder.Recorder)."""

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


#: The order of a block's three parts: layer -> norm -> act (Ioffe & Szegedy), layer -> act ->
#: norm (BN after the activation), or norm -> act -> layer (a pre-activation residual branch).
ORDERS = ("layer_norm_act", "layer_act_norm", "norm_act_layer")


class Block(nn.Module):
    """A linear/conv layer, a normalization and an activation, in one of :data:`ORDERS`.

    ``activation``: the name of ``act`` (a key of :data:`ACTIVATIONS`): what its outputs at rest
    or saturated are. ``pool``: in ``norm_act_layer`` order, what comes between the activation
    and the layer (a classifier head's pooling).
    """

    def __init__(
        self,
        layer: Layer,
        norm: nn.Module,
        act: nn.Module,
        norm_first: bool = True,
        order: str | None = None,
        activation: str = "relu",
        pool: nn.Module | None = None,
    ):
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act
        self.order = order or ("layer_norm_act" if norm_first else "layer_act_norm")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        self.activation = activation
        self.pool = pool
        self.probe: Probe | None = None

    def record_to(self, probe: Probe | None) -> None:
        """Hand the tensors at the block's positions to ``probe`` at each forward (None:
        nobody). A plain attribute, set without nn.Module's bookkeeping: a recorder arms and
        disarms its blocks between steps."""
        object.__setattr__(self, "probe", probe)

    @property
    def norm_first(self) -> bool:
        """Whether the activation takes the normalization's output directly."""
        return self.order != "layer_act_norm"

    @property
    def channels(self) -> int:
        """Channels at the block's normalization."""
        layer = self.layer
        if self.order == "norm_act_layer":
            return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "norm_act_layer":
            n = self.norm(x)
            a = self.act(n)
            out = self.layer(a if self.pool is None else self.pool(a))
            pre_norm, post_norm, pre_act, post_act = x, n, n, a
        elif self.order == "layer_norm_act":
            z = self.layer(x)
            n = self.norm(z)
            a = self.act(n)
            pre_norm, post_norm, pre_act, post_act, out = z, n, n, a, a
        else:
            z = self.layer(x)
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
        self._named = [(f"block{i}", b) for i, b in enumerate(blocks)]

    def blocks(self) -> list[tuple[str, Block]]:
        """(name, block) in the order the forward runs them."""
        return list(self._named)

    def residual_blocks(self) -> list[tuple[str, ResidualBlock]]:
        """(name, residual block) in order; none in a plain network."""
        return []

    def forward(self, x: Tensor) -> Tensor:
        if self.flatten_input:
            x = x.flatten(1)
        for _, block in self._named:
            x = block(x)
        return self.head(x)


class Shortcut(nn.Module):
    """He et al.'s option A: the identity, or, where a stage halves the resolution and doubles
    the channels, every other position with the new channels zero (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            every = (slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)
            x = x[every]
        if self.extra:
            x = nn.functional.pad(x, (0,) * (2 * (x.dim() - 2)) + (0, self.extra))
        return x


class ResidualBlock(nn.Module):
    r"""x -> shortcut(x) + alpha * branch(x), the branch two blocks ``a`` and ``b``; the shortcut
    is a :class:`Shortcut` (parameter-free) or, at a stage transition with projection shortcuts,
    a :class:`Block` of its own (a 1x1 convolution and its normalization).

    Post-activation (He et al. 2016a): branch = conv-norm-ReLU-conv-norm, and a ReLU after the
    sum (``b``'s activation is the identity: the ReLU takes the sum, not ``b``'s output).
    Pre-activation (He et al. 2016b): branch = norm-ReLU-conv-norm-ReLU-conv, nothing after the
    sum. ``alpha`` is 1, or with ``skip_init`` a learnable scalar that starts at 0 (SkipInit,
    De & Smith 2020). With ``keep`` set, the forward keeps what it added and what it returned
    (:attr:`branch_out`, :attr:`out`) for the signal propagation measurement.
    """

    def __init__(
        self, a: Block, b: Block, shortcut: Shortcut | Block, post_relu: bool, skip_init: bool
    ):
        super().__init__()
        self.a, self.b, self.shortcut = a, b, shortcut
        self.post_relu = post_relu
        self.skip_gain = nn.Parameter(torch.zeros(())) if skip_init else None
        self.keep = False
        self.branch_out: Tensor | None = None
        self.out: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        branch = self.b(self.a(x))
        if self.skip_gain is not None:
            branch = branch * self.skip_gain
        out = self.shortcut(x) + branch
        if self.post_relu:
            out = torch.relu(out)
        if self.keep:
            self.branch_out, self.out = branch.detach(), out.detach()
        return out


class ResNet(Net):
    """The CIFAR ResNet-(6n+2) of He et al. (2016): a stem, three stages of ``n`` residual
    blocks at width w, 2w and 4w (each later stage halves the resolution), then pooling and a
    linear classifier; the convolutions start from He et al.'s (2015) initialization.
    Pre-activation networks end with a norm and ReLU before the pooling (the ``final`` block,
    whose layer is the classifier)."""

    def __init__(self, stem: Block, res: list[ResidualBlock], head: nn.Module, final: Block | None):
        nn.Module.__init__(self)
        self.stem = stem
        self.res = nn.ModuleList(res)
        self._res = list(res)
        self.final = final
        self.head = head
        self.flatten_input = False
        self._named = [("stem", stem)]
        for k, r in enumerate(res):
            self._named += [(f"res{k}.a", r.a), (f"res{k}.b", r.b)]
            if isinstance(r.shortcut, Block):  # a projection: computed after the branch
                self._named.append((f"res{k}.shortcut", r.shortcut))
        if final is not None:
            self._named.append(("final", final))

    def residual_blocks(self) -> list[tuple[str, ResidualBlock]]:
        return [(f"res{k}", r) for k, r in enumerate(self._res)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for r in self._res:
            x = r(x)
        if self.final is not None:
            return self.final(x)
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
                    activation=m.activation,
                )
            )
            fan_in = m.width
        return Net(blocks, nn.Linear(fan_in, num_classes), flatten_input=True)
    spatial = len(input_shape) - 1
    if spatial not in (1, 2):
        raise ValueError(
            f"model.kind={m.kind!r} needs (C, L) or (C, H, W) inputs, got {input_shape}"
        )
    if m.kind == "resnet":
        return _resnet(cfg, input_shape, num_classes)
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
                activation=m.activation,
            )
        )
        channels = m.width
    head = nn.Sequential(*_pool(spatial), nn.Linear(channels, num_classes))
    return Net(blocks, head, flatten_input=False)


def _pool(spatial: int) -> nn.Sequential:
    """Global average pooling to (N, C)."""
    pool = nn.AdaptiveAvgPool1d(1) if spatial == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(pool, nn.Flatten())


def _resnet(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> ResNet:
    """He et al.'s CIFAR ResNet with ``model.depth`` residual blocks per stage."""
    m, norm = cfg.model, cfg.norm
    spatial = len(input_shape) - 1
    conv_cls = nn.Conv1d if spatial == 1 else nn.Conv2d
    bias = m.bias if m.bias is not None else norm.kind == "none"
    post = m.residual == "post"
    act = m.activation

    def conv(cin: int, cout: int, stride: int = 1, size: int = 3) -> nn.Conv1d | nn.Conv2d:
        layer = conv_cls(cin, cout, size, stride=stride, padding=size // 2, bias=bias)
        # He et al. (2015): a ReLU network keeps its signal's scale through each layer
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        return layer

    def normed(c: int) -> nn.Module:
        return NORMS[norm.kind](cfg, c, spatial)

    def block(cin: int, cout: int, stride: int, last: bool) -> Block:
        if post:  # conv -> norm -> act; the branch's last act follows the sum instead
            return Block(conv(cin, cout, stride), normed(cout),
                         nn.Identity() if last else ACTIVATIONS[act](),
                         order="layer_norm_act", activation="linear" if last else act)  # fmt: skip
        return Block(conv(cin, cout, stride), normed(cin), ACTIVATIONS[act](),
                     order="norm_act_layer", activation=act)  # fmt: skip

    def shortcut(cin: int, cout: int, stride: int) -> Shortcut | Block:
        """The identity within a stage; at a transition, He et al.'s option A or a projection
        (Brock et al. 2021: a pre-activation network projects the normalized, activated input,
        so the stream restarts at about unit variance)."""
        if m.shortcut == "zero_pad" or (cin == cout and stride == 1):
            return Shortcut(cin, cout, stride)
        if post:  # option B: conv-norm, added before the ReLU after the sum
            return Block(conv(cin, cout, stride, size=1), normed(cout), nn.Identity(),
                         order="layer_norm_act", activation="linear")  # fmt: skip
        return Block(conv(cin, cout, stride, size=1), normed(cin), ACTIVATIONS[act](),
                     order="norm_act_layer", activation=act)  # fmt: skip

    w = m.width
    if post:
        stem = Block(conv(input_shape[0], w), normed(w), ACTIVATIONS[act](), activation=act)
    else:  # the first residual branch normalizes the stem's output
        stem = Block(conv(input_shape[0], w), nn.Identity(), nn.Identity(), activation="linear")
    res: list[ResidualBlock] = []
    channels, size = w, min(input_shape[1:])
    for stage in range(3):
        out = w * 2**stage
        for i in range(m.depth):
            stride = 2 if stage > 0 and i == 0 and size >= 2 else 1
            size = (size + 1) // stride
            r = ResidualBlock(
                block(channels, out, stride, last=False),
                block(out, out, 1, last=True),
                shortcut(channels, out, stride),
                post_relu=post,
                skip_init=m.skip_init,
            )
            if m.zero_init_residual:  # the branch starts at zero (Goyal et al. 2017)
                gamma = getattr(r.b.norm, "weight", None)
                if isinstance(gamma, Tensor):
                    nn.init.zeros_(gamma)
            res.append(r)
            channels = out
    pool, classifier = _pool(spatial), nn.Linear(channels, num_classes)
    if post:
        return ResNet(stem, res, nn.Sequential(pool, classifier), None)
    final = Block(classifier, normed(channels), ACTIVATIONS[act](), order="norm_act_layer",
                  activation=act, pool=pool)  # fmt: skip
    return ResNet(stem, res, nn.Identity(), final)

"""Record every batch norm of any PyTorch model, while leaving the model exactly as it is.

:class:`Watcher` attaches to a model a user built (torchvision, timm, their own): the model keeps
its module objects and classes, its Parameters and buffers, its state_dict and its hooks, so an
optimizer made before or after attaching trains identically, and ``isinstance`` checks still hold.
Every training-mode call of ``torch.nn.functional.batch_norm`` whose running buffers or affine
parameters belong to the watched model (``nn.BatchNorm1d/2d/3d``, their lazy forms,
``nn.SyncBatchNorm`` outside a process group, subclasses with a forward of their own, any module
that calls ``F.batch_norm``) is computed by the very operator torch would run
(``torch._batch_norm_impl_index``: the same kernel, bit for bit the same result and gradients),
which also hands back the batch mean and inverse standard deviation it computed: the layer is its
own probe. A hook on its backward node takes the squared norms of the gradient through it. Under
torch.func transforms torch's batch norm runs unrecorded; under torch.compile each BN is a graph
break, run (and recorded) eagerly. bncore's own BatchNorm layers record themselves.

Per BN layer and logged step (several forwards between two logs, as in gradient accumulation,
are averaged; gamma and beta gradients are their ``.grad``, what the optimizer steps on):

- the batch mean and biased variance it normalized with, the running statistics, gamma, beta;
- dL/dgamma and dL/dbeta, and the squared norms of the activation gradient through it;
- the activation module that consumes its output (found on the first forward, in execution order):
  its mean, variance and share at rest or saturated (dead ReLUs); NaN, with a reason in
  :attr:`Watcher.notes`, where no activation module takes BN's output directly;
- the weight of the Linear/Conv module that feeds it: the norm of that weight and of its
  gradient, every ``weight_interval`` logged steps (a pass over every weight costs about 5% of a
  ResNet-18 step on a CPU).

Layers are named by module path (``layer1.0.bn1``), in order of first execution.
:meth:`Watcher.log` keeps one step's row on the device; :meth:`Watcher.flush` moves the pending
rows to the host in one transfer and returns ``layers`` and ``channels`` tables
(:mod:`bncore.records`); per-channel arrays are kept every ``channel_interval`` logged steps.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bncore.batchnorm import _BatchNorm as _BncoreBatchNorm
from bncore.kernels import channel_moments
from bncore.records import Records, bn_output_rows, channel_rows, channel_table, summarize
from bncore.stats import RECORD_ROWS, BNStats

__all__ = ["ACTIVATIONS", "Watcher"]

#: Activation modules whose output is measured, with their rest/saturation bounds (values at or
#: below lo, at or above hi); None: no such bound (the saturated share is NaN).
ACTIVATIONS: dict[type[nn.Module], tuple[float, float] | None] = {
    nn.ReLU: (0.0, math.inf),
    nn.ReLU6: (0.0, 6.0),
    nn.Sigmoid: (0.01, 0.99),
    nn.Tanh: (-0.99, 0.99),
    nn.Hardsigmoid: (0.0, 1.0),
    nn.Hardtanh: (-1.0, 1.0),
    nn.LeakyReLU: None,
    nn.ELU: None,
    nn.GELU: None,
    nn.SiLU: None,
    nn.Hardswish: None,
    nn.Mish: None,
}
#: Modules whose weight can feed a BN layer.
WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
_ROW = {name: i for i, name in enumerate(RECORD_ROWS)}
_SCALARS = ("weight_grad_norm", "weight_norm")


def _functorch(*tensors: Tensor | None) -> bool:
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and is_wrapped(t) for t in tensors)


@dataclass
class _Layer:
    """One watched BN layer: what its forwards since the last log left, and its neighbours."""

    name: str
    module: nn.Module
    channels: int
    eps: float
    affine: tuple[bool, bool]  # has gamma, has beta
    stats: BNStats = field(default_factory=BNStats)
    means: list[Tensor] = field(default_factory=list)
    variances: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)  # (4, C) each, filled by the backward
    acts: list[Tensor] = field(default_factory=list)  # (4, C) each
    tensors: tuple[Tensor | None, ...] = (None, None, None, None)  # running mean/var, gamma, beta
    activation: nn.Module | None = None
    act_bounds: tuple[float, float] | None = None
    weight: nn.Parameter | None = None  # of the layer feeding it
    last_output: Any = None  # (weakref to the last output, its version then)
    nan: Tensor | None = None

    def forwarded(self, mean: Tensor, var: Tensor, grad: Tensor, act: Tensor | None) -> None:
        self.means.append(mean)
        self.variances.append(var)
        self.grads.append(grad)
        if act is not None:
            self.acts.append(act)

    def row(self, weight_norms: bool) -> list[Tensor]:
        """This layer's part of a logged step: RECORD_ROWS (C each), then the two scalars."""
        nan = self.nan
        assert nan is not None
        count = len(self.means)
        if count == 0:  # not run since the last log
            mean = var = nan
            grad = nan.expand(4, -1)
        elif count == 1:
            mean, var, grad = self.means[0], self.variances[0], self.grads[0]
        else:
            mean = torch.stack(self.means).mean(0)
            var = torch.stack(self.variances).mean(0)
            grad = torch.stack(self.grads).sum(0)
        if self.acts:
            act = self.acts[0] if len(self.acts) == 1 else torch.stack(self.acts).mean(0)
        else:
            act = nan.expand(4, -1)
        rm, rv, gamma, beta = self.tensors
        module = self.module
        params = module._parameters
        g_grad = _grad(params.get("weight"))
        b_grad = _grad(params.get("bias"))
        parts = [
            mean,
            var,
            act.reshape(-1),
            *(t.detach() if t is not None else nan for t in (rm, rv, gamma, beta)),
            g_grad if g_grad is not None else nan,
            b_grad if b_grad is not None else nan,
            grad[2:].reshape(-1),
        ]
        w = self.weight
        if weight_norms and w is not None:
            wg = w.grad
            norms = [
                torch.linalg.vector_norm(wg).reshape(1) if wg is not None else nan[:1],
                torch.linalg.vector_norm(w.detach()).reshape(1),
            ]
        else:
            norms = [nan[:1], nan[:1]]
        self.means, self.variances, self.grads, self.acts = [], [], [], []
        return [p.reshape(-1) for p in parts] + norms

    @property
    def width(self) -> int:
        return len(RECORD_ROWS) * self.channels + len(_SCALARS)


def _grad(p: nn.Parameter | None) -> Tensor | None:
    return None if p is None else p.grad


class Watcher:
    """Records every BN layer of ``model`` on each :meth:`log`; see the module docstring."""

    def __init__(
        self, model: nn.Module, channel_interval: int = 10, weight_interval: int = 10
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() takes a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("channel_interval", channel_interval),
                            ("weight_interval", weight_interval)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.model = model
        self.channel_interval, self.weight_interval = channel_interval, weight_interval
        self.layers: dict[str, _Layer] = {}
        self.notes: dict[str, str] = {}  # what is not recorded, and why
        self._owners: dict[int, tuple[Tensor, str, nn.Module]] = {}
        self._strangers: set[int] = set()
        self._modules: dict[int, str] = {}
        self._by_module: dict[int, _Layer] = {}
        self._hooks: list[Any] = []
        self._discovering = True
        self._discovery_hooks: list[Any] = []
        self._weight_outputs: dict[int, tuple[Any, int, nn.Module]] = {}
        self._rows: list[Tensor] = []
        self.pending_steps: list[int] = []
        self.logged = 0
        self._index()
        for m in model.modules():
            if isinstance(m, _BncoreBatchNorm):
                self._hooks.append(m.register_forward_hook(self._bncore_forward))
            if isinstance(m, nn.SyncBatchNorm):
                self.notes.setdefault(
                    "sync_batch_norm",
                    "SyncBatchNorm layers: inside a process group their recorded statistics are "
                    "this process's own batch; they normalize with the synchronized ones",
                )
        _install(self)
        # until the first training forward: who consumes BN's output, who feeds its input
        for m in model.modules():
            if type(m) in ACTIVATIONS:
                self._discovery_hooks.append(m.register_forward_pre_hook(self._discover_pre))
            if isinstance(m, WEIGHTED) or m is model:
                self._discovery_hooks.append(m.register_forward_hook(self._discover_post))

    # -- attaching ----------------------------------------------------------------------------

    def _index(self) -> None:
        """Which module owns each parameter and buffer (buffers are new tensors after .to())."""
        self._owners.clear()
        self._strangers.clear()
        self._modules = {id(m): name for name, m in self.model.named_modules()}
        for name, m in self.model.named_modules():
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None:
                    self._owners[id(t)] = (t, name, m)

    def _owner(self, *tensors: Tensor | None) -> tuple[str, nn.Module] | None:
        for t in tensors:
            if t is None:
                continue
            hit = self._owners.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1], hit[2]
        keys = [id(t) for t in tensors if t is not None]
        if not keys or all(k in self._strangers for k in keys):
            return None
        self._index()  # moved or materialized since: look again, once per tensor
        for t in tensors:
            hit = self._owners.get(id(t)) if t is not None else None
            if hit is not None and hit[0] is t:
                return hit[1], hit[2]
        self._strangers.update(keys)
        return None

    def _layer(self, name: str, module: nn.Module, channels: int, eps: float) -> _Layer:
        layer = self._by_module.get(id(module))
        if layer is None:
            params = module._parameters
            affine = (params.get("weight") is not None, params.get("bias") is not None)
            layer = _Layer(name or type(module).__name__, module, channels, eps, affine)
            self.layers[layer.name] = layer
            self._by_module[id(module)] = layer
        if layer.nan is None or layer.channels != channels:
            layer.channels = channels
            layer.nan = torch.full((channels,), math.nan, device=self._device(module))
        return layer

    @staticmethod
    def _device(module: nn.Module) -> torch.device:
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            return t.device
        return torch.device("cpu")

    def close(self) -> None:
        """Detach from the model: it is as it was before (no hook, no patch left)."""
        for h in self._hooks + self._discovery_hooks:
            h.remove()
        self._hooks, self._discovery_hooks = [], []
        _uninstall(self)

    # -- the forward --------------------------------------------------------------------------

    def batch_norm(
        self,
        owner: tuple[str, nn.Module],
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        """A training-mode F.batch_norm of a watched layer: computed and recorded."""
        name, module = owner
        layer = self._layer(name, module, input.shape[1], eps)
        layer.tensors = (running_mean, running_var, weight, bias)
        if self._discovering:
            self._note_input(layer, input)
        # The very call torch.batch_norm makes (bit for bit torch's result, forward and
        # backward), which also hands back the batch mean and 1/sqrt(var + eps) it computed.
        y, mean, invstd, _, _ = torch._batch_norm_impl_index(
            input, weight, bias, running_mean, running_var, True, momentum, eps,
            torch.backends.cudnn.enabled,
        )  # fmt: skip
        grad = torch.full((4, input.shape[1]), math.nan, device=input.device)
        with torch.no_grad():
            var = invstd.detach().float().pow(-2).sub_(eps)
        layer.forwarded(mean.detach(), var, grad, None)
        node = y.grad_fn
        if node is not None:
            node.register_hook(_gradient_sums(grad, input.dim()))
        layer.last_output = (weakref.ref(y), y._version)
        return y

    def _bncore_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """bncore's own layers computed and recorded themselves: keep what they left."""
        if not module.training or torch.compiler.is_compiling():
            return
        assert isinstance(module, _BncoreBatchNorm)
        s = module.stats
        if s.mean is None or s.var is None or s.grad is None:
            return
        name = self._modules.get(id(module), "")
        layer = self._layer(name, module, module.num_features, module.eps)
        buffers, params = module._buffers, module._parameters
        layer.tensors = (buffers["running_mean"], buffers["running_var"], params["weight"],
                         params["bias"])  # fmt: skip
        layer.forwarded(s.mean, s.var, s.grad, None)
        if self._discovering:
            self._note_input(layer, args[0])
        layer.last_output = (weakref.ref(output), output._version)

    # -- neighbours, found on the first forward -----------------------------------------------

    def _note_input(self, layer: _Layer, x: Tensor) -> None:
        hit = self._weight_outputs.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            w = hit[2]._parameters.get("weight")
            if isinstance(w, nn.Parameter):
                layer.weight = w

    def _discover_pre(self, module: nn.Module, args: tuple) -> None:
        if not args or torch.compiler.is_compiling():
            return
        bounds = ACTIVATIONS[type(module)]
        x = args[0]
        for layer in self.layers.values():
            out = layer.last_output
            # the same tensor, not modified in place since (a residual sum would be)
            if (
                layer.activation is None
                and out is not None
                and out[0]() is x
                and out[1] == x._version
            ):
                layer.activation = module
                layer.act_bounds = bounds

    def _discover_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if isinstance(module, WEIGHTED) and isinstance(output, Tensor):
            self._weight_outputs[id(output)] = (weakref.ref(output), output._version, module)
        if module is self.model:
            self._end_discovery()

    def _end_discovery(self) -> None:
        """After the first forward: measure the activations found, note what was not."""
        if not self.layers:
            return  # nothing batch-normalized in training mode yet (eval, or no BN): try again
        self._discovering = False
        for h in self._discovery_hooks:
            h.remove()
        self._discovery_hooks, self._weight_outputs = [], {}
        consumers: dict[int, list[_Layer]] = {}
        for layer in self.layers.values():
            if layer.activation is not None:
                consumers.setdefault(id(layer.activation), []).append(layer)
        for layers in consumers.values():  # one module may serve several layers (ResNet's relu)
            act = layers[0].activation
            assert act is not None
            self._hooks.append(act.register_forward_hook(self._activation_hook(layers)))
        missing = [n for n, la in self.layers.items() if la.activation is None]
        if missing:
            self.notes["act"] = (
                "no activation module takes the output of "
                + ", ".join(missing[:8])
                + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                + " directly (a residual sum or a functional call comes first)"
            )
        unfed = [n for n, la in self.layers.items() if la.weight is None]
        if unfed:
            self.notes["weight"] = (
                "no Linear/Conv module feeds " + ", ".join(unfed[:8])
                + (f" and {len(unfed) - 8} more" if len(unfed) > 8 else "")
            )  # fmt: skip

    @staticmethod
    def _activation_hook(layers: list[_Layer]) -> Callable[..., None]:
        """Measures the activation's output when its input is one of ``layers``' output."""
        bounds = layers[0].act_bounds
        lo, hi = bounds if bounds is not None else (-math.inf, math.inf)

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not args or torch.compiler.is_compiling():
                return
            for layer in layers:
                out = layer.last_output
                if out is not None and out[0]() is args[0] and layer.module.training:
                    m = channel_moments(output.detach(), lo, hi).float()
                    if bounds is None:
                        m[2:] = math.nan
                    layer.acts.append(m)
                    return

        return hook

    # -- logging ------------------------------------------------------------------------------

    @torch.no_grad()
    def log(self, step: int) -> None:
        """After the backward of ``step`` (before or after the optimizer's step): keep the
        statistics of every forward since the last log as one row, on the device."""
        if not self.layers:
            return
        norms = self.logged % self.weight_interval == 0
        parts: list[Tensor] = []
        for layer in self.layers.values():
            parts += layer.row(norms)
        device = parts[0].device
        self._rows.append(torch.cat([p.to(device, torch.float32) for p in parts]))
        self.pending_steps.append(step)
        self.logged += 1

    def flush(self) -> Records:
        """The pending rows, in one transfer, as ``layers`` and ``channels`` tables."""
        if not self._rows:
            return Records()
        if len({r.numel() for r in self._rows}) > 1:  # a layer first ran after some logs
            width = max(r.numel() for r in self._rows)
            self._rows = [torch.nn.functional.pad(r, (0, width - r.numel()), value=math.nan)
                          for r in self._rows]  # fmt: skip
        raw = torch.stack(self._rows).cpu().numpy().astype(np.float64)
        steps = np.asarray(self.pending_steps, np.int64)
        first = self.logged - len(steps)
        keep = (first + np.arange(len(steps))) % self.channel_interval == 0
        self._rows, self.pending_steps = [], []
        n, k = len(steps), len(RECORD_ROWS)
        layers, chans, offset = [], [], 0
        for name, layer in self.layers.items():
            c = layer.channels
            block = raw[:, offset : offset + layer.width]
            offset += layer.width
            if block.shape[1] < layer.width:  # joined after these steps
                block = np.full((n, layer.width), np.nan)
            rows = dict(zip(RECORD_ROWS, block[:, : k * c].reshape(n, k, c).transpose(1, 0, 2),
                            strict=True))  # fmt: skip
            gamma, beta = layer.affine
            rows["post_mean"], rows["post_var"] = bn_output_rows(
                rows["pre_var"], rows["gamma"] if gamma else None,
                rows["beta"] if beta else None, layer.eps,
            )  # fmt: skip
            scalars = block[:, k * c :]
            cols = summarize(rows, np.empty((n, 3, 0)), scalars[:, 0], np.full(n, np.nan))
            cols["weight_norm"] = scalars[:, 1].astype(np.float32)
            layers.append({"step": steps, "layer": np.full(n, name), **cols})
            if keep.any():
                chans.append({"step": steps[keep], "layer": np.full(int(keep.sum()), name),
                              **channel_rows({r: v[keep] for r, v in rows.items()})})  # fmt: skip
        table = {key: np.stack([t[key] for t in layers], 1).reshape(-1) for key in layers[0]}
        return Records(layers=table, channels=channel_table(chans, by_step=True))

    def meta(self) -> dict[str, Any]:
        """What the run's layers are (for a sink's ``start``)."""
        return {
            "layers": list(self.layers),
            "channels": [la.channels for la in self.layers.values()],
            "tracked_units": [[] for _ in self.layers],
            "layer_kinds": [type(la.module).__name__ for la in self.layers.values()],
            "not_recorded": dict(self.notes),
        }


def _gradient_sums(grad: Tensor, ndim: int) -> Callable[..., None]:
    """A hook on BN's backward node: per-channel sums of dy^2 and dx^2 into rows 2 and 3."""
    dims = [d for d in range(ndim) if d != 1]

    def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]):
        with torch.no_grad():
            for row, g in ((2, grad_outputs[0]), (3, grad_inputs[0])):
                if g is not None:
                    g = g if g.dtype in (torch.float32, torch.float64) else g.float()
                    grad[row].copy_(torch.linalg.vector_norm(g, 2, dims).square())

    return hook


# -- the one patch: torch.nn.functional.batch_norm, while any watcher is attached --------------

_ORIGINAL = F.batch_norm
_ACTIVE: list[Watcher] = []


def _watched(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.batch_norm, recorded where the layer is watched."""
    if training and _ACTIVE and isinstance(input, Tensor):
        if torch.compiler.is_compiling():
            return _watched_eager(input, running_mean, running_var, weight, bias, momentum, eps)
        y = _record(input, running_mean, running_var, weight, bias, momentum, eps)
        if y is not None:
            return y
    return _ORIGINAL(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _record(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor | None:
    if _functorch(input, weight, bias, running_mean):
        return None  # torch.func transforms: torch's own batch norm, as unwatched
    for watcher in _ACTIVE:
        owner = watcher._owner(running_mean, weight, bias, running_var)
        if owner is not None and owner[1].training:
            if input.numel() == input.shape[1] or eps <= 0:
                return None  # torch's own error message
            return watcher.batch_norm(
                owner, input, running_mean, running_var, weight, bias, momentum, eps
            )
    return None


@torch.compiler.disable
def _watched_eager(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """Under torch.compile: a graph break, and the layer runs (recorded) outside the graph."""
    y = _record(input, running_mean, running_var, weight, bias, momentum, eps)
    if y is None:
        y = _ORIGINAL(input, running_mean, running_var, weight, bias, True, momentum, eps)
    return y


def _install(watcher: Watcher) -> None:
    if not _ACTIVE:
        F.batch_norm = _watched
    _ACTIVE.append(watcher)


def _uninstall(watcher: Watcher) -> None:
    if watcher in _ACTIVE:
        _ACTIVE.remove(watcher)
    if not _ACTIVE and F.batch_norm is _watched:
        F.batch_norm = _ORIGINAL

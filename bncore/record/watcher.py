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
torch.func transforms, tracing and inference mode torch's batch norm runs unrecorded; under
torch.compile a watched BN goes in the graph as torch's own ops, recorded when the graph runs
(:mod:`bncore.record.compiled`: no graph break). bncore's own BatchNorm layers record
themselves, as they do in bncore's networks: the watcher hands each its
:class:`~bncore.nn.byproducts.Recording`, and each training forward writes its row of
:data:`~bncore.nn.byproducts.RECORD_ROWS`.

Per BN layer, at every logged step, what the layer computed anyway (several forwards between
two logs, as in gradient accumulation, are averaged; gamma and beta gradients are their
``.grad``, what the optimizer steps on): the batch mean and biased variance it normalized with,
the running statistics, gamma, beta, dL/dgamma and dL/dbeta. Every ``measure_interval`` logged
steps (default 10; 1 for every step), what takes an extra pass over data (on a 6 x 256 MLP on a
CPU, about 25% of a step when taken at every step):

- the squared norms of the activation gradient reaching BN's output and leaving its input;
- the activation module that consumes its output (found on the first forward, in execution order):
  its mean, variance and share at rest or saturated (dead ReLUs); NaN, with a reason in
  :attr:`Watcher.notes`, where no activation module takes BN's output directly;
- the weight of the Linear/Conv module that feeds it: the norm of that weight and of its
  gradient.

Layers are named by module path (``layer1.0.bn1``), in order of first execution.
:meth:`Watcher.log` keeps one step's row on the device; :meth:`Watcher.flush` moves the pending
rows to the host in one transfer and returns ``layers`` and ``channels`` tables, derived as the
recorder of bncore's networks derives them (:mod:`bncore.record.core`); per-channel arrays are
kept every ``channel_interval`` logged steps.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bncore.nn.batchnorm import BatchNorm
from bncore.nn.byproducts import RECORD_ACT, RECORD_GRAD, RECORD_ROWS, Recording, RecordTarget
from bncore.nn.kernels import channel_moments, cpu
from bncore.record import compiled, core
from bncore.record.core import SATURATION
from bncore.record.tables import Records

__all__ = ["ACTIVATION_MODULES", "Watcher", "bn_modules", "frozen_batch_norms", "is_batch_norm"]

#: Activation modules whose output is measured, by the name of their rest/saturation bounds in
#: bncore.record.core.SATURATION (None there: no such bound, the saturated share is NaN).
ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardtanh: "hardtanh",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Mish: "mish",
}


class BatchNormCall(NamedTuple):
    """The arguments of a training-mode ``F.batch_norm`` call (``training`` is True)."""

    input: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    momentum: float
    eps: float


#: Modules whose weight can feed a BN layer.
WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def _unseen() -> bool:
    """Whether the modules' hooks must not look: under torch.compile (a graph, not tensors),
    tracing or inference mode (tensors without versions)."""
    return (
        torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_inference_mode_enabled()
    )


def _recordable(input: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a training-mode batch norm may be recorded: not an empty batch, not under
    tracing or inference mode (which keep no versions), not inside torch.func transforms."""
    if torch.jit.is_tracing() or torch.is_inference_mode_enabled() or input.numel() == 0:
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(t is not None and is_wrapped(t) for t in (input, *tensors))


#: A gradient's per-channel moments (rows mean and biased variance, over ``m`` values each);
#: its squared norm is m * (var + mean^2), taken on the host at flush.
_Moments = tuple[Tensor, int]


@dataclass
class _Layer:
    """One watched BN layer: what its forwards since the last log left, and its neighbours.

    A forward leaves the batch mean and 1/sqrt(var + eps) (what torch's kernel returns; the
    variance is recovered on the host), its backward the moments of the gradient reaching and
    leaving the layer (one fused reduction each), the activation after it its moments.
    """

    name: str
    module: nn.Module
    channels: int
    eps: float
    affine: tuple[bool, bool]  # has gamma, has beta
    momentum: float | None = None  # of its first call (a module's own attribute wins in meta)
    input_dtype: torch.dtype | None = None
    zero_gamma: Tensor | bool | None = None  # gamma all zero at its first forward
    counter: Tensor | None = None  # the gamma whose gradient accumulations count backwards
    counted_in_cpp: cpu.CountedGrads | None = None  # those counts, where kept in C++
    feeder_bias: bool = False  # the Linear/Conv feeding it has a bias
    # since the last log: training forwards, of which without autograd, backward passes, and
    # the sums of N and m over the forwards
    forwards: int = 0
    no_grad: int = 0
    backwards: int = 0
    examples: int = 0
    values: int = 0
    means: list[Tensor] = field(default_factory=list)
    invstds: list[Tensor] = field(default_factory=list)
    dy: list[_Moments] = field(default_factory=list)
    dx: list[_Moments] = field(default_factory=list)
    acts: list[Tensor] = field(default_factory=list)  # (4, C) each
    tensors: tuple[Tensor | None, ...] = (None, None, None, None)  # running mean/var, gamma, beta
    activation: nn.Module | None = None
    act_bounds: tuple[float, float] | None = None
    weight: nn.Parameter | None = None  # of the layer feeding it
    last_output: Any = None  # (weakref to the last output, its version then)
    nan: Tensor | None = None
    counts: Any = (math.nan, math.nan)  # values per channel behind dy's and dx's moments
    # bncore's own layer: the rows its forwards since the last log wrote, and their m
    written: list[tuple[RecordTarget, int]] = field(default_factory=list)

    def ran(self, input: Tensor) -> None:
        """A training forward of the layer: counted (attribute reads, no tensor work)."""
        n, m = input.shape[0], input.numel() // input.shape[1]
        self.count((n, m, torch.is_grad_enabled()), input.dtype)

    def count(self, counts: tuple[int, int, bool], dtype: torch.dtype) -> None:
        """A training forward of (examples, values per channel, with autograd) in ``dtype``."""
        n, m, grad = counts
        self.forwards += 1
        self.examples += n
        self.values += m
        self.input_dtype = dtype
        if not grad:
            self.no_grad += 1

    def count_backward(self, _: Any) -> None:
        """One more backward pass through the layer: a hook on its gamma's gradient
        accumulation, or (gamma not trained) a pre-hook on its backward node."""
        self.backwards += 1

    def counted_by_gamma(self, weight: Tensor | None) -> bool:
        """Whether this forward's backward pass is counted by the hook on gamma's gradient
        accumulation (registered once: a hook on each forward's backward node costs about
        15 us a layer and step, two points of a small MLP's speed), else by a hook on this
        forward's backward node. Per backward pass, once: a layer run twice in one graph (two
        views through one encoder) counts one backward for two forwards."""
        return weight is not None and weight is self.counter and weight.requires_grad

    def counted(self) -> tuple[float, float, float, float, float]:
        """:data:`COUNTS` since the last log (batch_n and batch_m NaN without a forward), and
        the counters started again."""
        k = self.forwards
        n = self.examples / k if k else math.nan
        m = self.values / k if k else math.nan
        backwards = self.backwards + (self.counted_in_cpp.take() if self.counted_in_cpp else 0)
        out = (n, m, float(k), float(self.no_grad), float(backwards))
        self.forwards = self.no_grad = self.backwards = self.examples = self.values = 0
        return out

    def take(self, measured: bool, row: list[Tensor]) -> list[Tensor] | None:
        """Append this layer's part of a logged step to ``row`` (:data:`FREE`, :data:`LIVE`,
        :data:`SCALARS`: one value tensor each, copied at once) and return, on a measured step,
        the :data:`MEASURED` tensors (made for this step, so kept by reference until flush)."""
        nan = self.nan
        assert nan is not None
        if self.written:
            self._read_written(measured)
        count = len(self.means)
        if count == 1:
            row += (self.means[0], self.invstds[0])
        elif count == 0:  # not run since the last log
            row += (nan, nan)
        else:  # micro-batches: the average of what each normalized with
            var = torch.stack(self.invstds).double().pow(-2).mean(0)
            row += (torch.stack(self.means).mean(0), var.rsqrt())
        rm, rv, gamma, beta = self.tensors
        row += (
            nan if rm is None else rm,
            nan if rv is None else rv,
            nan if gamma is None else gamma,
            nan if beta is None else beta,
        )
        params = self.module._parameters
        for p in (params.get("weight"), params.get("bias")):
            g = None if p is None else p.grad
            row.append(nan if g is None else g)
        self.means, self.invstds = [], []
        nan1 = nan[:1]
        if not measured:
            row += (nan1, nan1)
            return None
        w = self.weight
        if w is not None:
            wg = w.grad
            row.append(nan1 if wg is None else torch.linalg.vector_norm(wg).reshape(1))
            row.append(torch.linalg.vector_norm(w).reshape(1))
        else:
            row += (nan1, nan1)
        if self.acts:
            act = self.acts[0] if len(self.acts) == 1 else torch.stack(self.acts).mean(0)
        else:
            act = self.nan4
        dy, m_dy = _combine(self.dy, self.nan2)
        dx, m_dx = _combine(self.dx, self.nan2)
        self.counts = (m_dy, m_dx)
        self.dy, self.dx, self.acts = [], [], []
        return [act, dy, dx]

    def _read_written(self, measured: bool) -> None:
        """bncore's own layer: what its forwards wrote into their rows (batch mean and
        variance; after the backward, the squared gradient norms: moments of mean 0)."""
        for target, m in self.written:
            rows = target.row.view(len(RECORD_ROWS), -1)
            self.means.append(rows[0])
            self.invstds.append((rows[1] + self.eps).rsqrt())
            if measured:
                zero = torch.zeros_like(rows[0])
                for found, i in ((self.dy, RECORD_GRAD + 2), (self.dx, RECORD_GRAD + 3)):
                    found.append((torch.stack([zero, rows[i] / m]), m))
        self.written = []

    def placeholder(self) -> list[Tensor]:
        """take()'s measured part for a step logged before this layer first ran."""
        assert self.nan is not None
        return [self.nan4, self.nan2, self.nan2]

    @property
    def nan4(self) -> Tensor:
        assert self.nan is not None
        return core.nan_rows(4, self.channels, self.nan.device)

    @property
    def nan2(self) -> Tensor:
        assert self.nan is not None
        return core.nan_rows(2, self.channels, self.nan.device)


#: A layer's values in a logged step (C each, but SCALARS): FREE, LIVE and SCALARS are copied
#: into the step's row at log; MEASURED, on measured steps, are kept by reference until flush.
FREE = ("pre_mean", "invstd")
MEASURED = ("act_mean", "act_var", "act_lo", "act_hi", "dy_mean", "dy_var", "dx_mean", "dx_var")
LIVE = ("running_mean", "running_var", "gamma", "beta", "gamma_grad", "beta_grad")
SCALARS = ("weight_grad_norm", "weight_norm")
#: Counted on the host at every forward and backward, per layer and logged step
#: (bncore.statistics: the normalization batch, its values per channel, the forwards).
COUNTS = ("batch_n", "batch_m", "forwards", "forwards_no_grad", "backwards")
#: COUNTS of a layer in a step logged before it first ran.
_NO_COUNTS = (math.nan, math.nan, 0.0, 0.0, 0.0)
#: Dropout modules, whose place before a BN the watcher notes (Li et al. 2019's variance shift).
DROPOUT = nn.modules.dropout._DropoutNd


def _combine(moments: list[_Moments], nan2: Tensor) -> tuple[Tensor, float]:
    """One (2, C) mean/variance and value count for all the micro-batches' gradients."""
    if not moments:
        return nan2, math.nan
    if len(moments) == 1:
        return moments[0][0][:2], float(moments[0][1])
    total = sum(m for _, m in moments)
    sq = sum(m * (t[1].double() + t[0].double().square()) for t, m in moments)
    assert isinstance(sq, Tensor)  # two or more terms: not sum()'s start, 0
    return torch.stack([torch.zeros_like(sq), sq / total]), float(total)


class Watcher:
    """Records every BN layer of ``model`` on each :meth:`log`; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        channel_interval: int = 20,
        measure_interval: int = 20,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    ) -> None:
        """``optimizer`` (one or several): what :meth:`meta` says of the weight decay on each
        layer's gamma and on the weights feeding them."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() takes a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("channel_interval", channel_interval),
                            ("measure_interval", measure_interval)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.model = model
        self.channel_interval, self.measure_interval = channel_interval, measure_interval
        self.measuring = True  # whether the step being trained is one of the measured ones
        self.layers: dict[str, _Layer] = {}
        self.notes: dict[str, str] = {}  # what is not recorded, and why
        self._owners: dict[int, tuple[Tensor, str, nn.Module]] = {}
        self._strangers: set[int] = set()
        self._named: dict[int, tuple[str, nn.Module]] = {}  # by id(module)
        self._by_module: dict[int, _Layer] = {}
        self._hooks: list[Any] = []
        self._discovering = True
        self._discovery_hooks: list[Any] = []
        self._weight_outputs: dict[int, tuple[Any, int, nn.Module]] = {}
        self._rows: list[Tensor] = []  # per logged step: what every step has, copied
        self._more: list[list[list[Tensor] | None] | None] = []  # measured steps: references
        self._counts: list[list[tuple[float, float]]] = []
        self._host_counts: list[list[tuple[float, ...]]] = []  # per logged step: COUNTS
        self.pending_steps: list[int] = []
        if optimizer is None:
            self.optimizers: list[torch.optim.Optimizer] = []
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.optimizers = [optimizer]
        else:
            self.optimizers = list(optimizer)
        self._paused = False  # a probe's forwards: not recorded, not counted
        # the first training forward's structure, in execution order: the dropouts run since
        # the last Linear/Conv, the last BN run and whether a Linear/Conv ran after it
        self._dropouts: list[float] = []
        self._dropout_before: dict[str, float] = {}
        self._last_bn: str | None = None
        self._weighted_after_bn = False
        self._output_layer: str | None = None
        self.logged = 0
        self._index()
        self._indexed = -1  # the first miss may look again at once (a .to() after watch())
        self._recordings: list[tuple[BatchNorm, Recording | None]] = []
        for m in model.modules():
            if isinstance(m, BatchNorm):
                self._recordings.append((m, m.record_to(_OwnLayer(self, m))))
                self._hooks.append(m.register_forward_hook(self._own_output))
            if isinstance(m, nn.SyncBatchNorm):
                self.notes.setdefault(
                    "sync_batch_norm",
                    "SyncBatchNorm layers: outside a process group they normalize with this "
                    "process's batch and are recorded like BatchNorm; inside one they "
                    "synchronize through their own autograd function, which is not recorded",
                )
        # a BN without parameters or buffers (affine=False, track_running_stats=False) is
        # known by running: a hook on its forward says whose F.batch_norm call comes next
        self._bare: list[nn.Module] = []
        self._frozen: dict[str, dict[str, Any]] | None = None
        for m in model.modules():
            bare = all(t is None for t in (*m._parameters.values(), *m._buffers.values()))
            if bare and is_batch_norm(m) and not isinstance(m, BatchNorm):
                self._hooks.append(m.register_forward_pre_hook(self._bare_enter))
                self._hooks.append(m.register_forward_hook(self._bare_exit, always_call=True))
        _install(self)
        # until the first training forward: who consumes BN's output, who feeds its input
        for m in model.modules():
            if type(m) in ACTIVATION_MODULES:
                self._discovery_hooks.append(m.register_forward_pre_hook(self._discover_pre))
            if isinstance(m, DROPOUT):
                self._discovery_hooks.append(m.register_forward_hook(self._discover_dropout))
            if isinstance(m, WEIGHTED) or m is model:
                self._discovery_hooks.append(m.register_forward_hook(self._discover_post))

    # -- attaching ----------------------------------------------------------------------------

    def _index(self) -> None:
        """Which module owns each parameter and buffer (buffers are new tensors after .to());
        looked at again at most once per logged step, on a miss."""
        self._indexed = self.logged
        self._owners.clear()
        self._strangers.clear()
        self._named = {id(m): (name, m) for name, m in self.model.named_modules()}
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
        if not keys or all(k in self._strangers for k in keys) or self._indexed == self.logged:
            return None
        self._index()  # moved or materialized since: look again, once per tensor
        for t in tensors:
            hit = self._owners.get(id(t)) if t is not None else None
            if hit is not None and hit[0] is t:
                return hit[1], hit[2]
        self._strangers.update(keys)
        return None

    def _bare_enter(self, module: nn.Module, args: tuple) -> None:
        self._bare.append(module)

    def _bare_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._bare and self._bare[-1] is module:
            self._bare.pop()

    def bare_owner(self) -> tuple[str, nn.Module] | None:
        """The BN without parameters or buffers whose forward is running, if any."""
        if not self._bare:
            return None
        module = self._bare[-1]
        return self._named.get(id(module), ("", module))[0], module

    def _layer(
        self,
        name: str,
        module: nn.Module,
        channels: int,
        eps: float,
        weight: Tensor | None,
        momentum: float | None,
        device: torch.device,
    ) -> _Layer:
        layer = self._by_module.get(id(module))
        if layer is None:
            params = module._parameters
            affine = (params.get("weight") is not None, params.get("bias") is not None)
            layer = _Layer(name or type(module).__name__, module, channels, eps, affine, momentum)
            # one comparison on the device, read at meta (no host sync in the forward)
            layer.zero_gamma = None if weight is None else torch.all(weight.detach() == 0)
            if isinstance(weight, nn.Parameter) and weight.requires_grad:  # a leaf: its
                # gradient accumulations count the backward passes; in C++ where it can be
                layer.counted_in_cpp = cpu.count_grads(weight)
                self._hooks.append(
                    layer.counted_in_cpp
                    or weight.register_post_accumulate_grad_hook(layer.count_backward)
                )
                layer.counter = weight
            self.layers[layer.name] = layer
            self._by_module[id(module)] = layer
        if layer.nan is None or layer.channels != channels:
            layer.channels = channels
            layer.nan = core.nan_rows(0, channels, device)
        return layer

    def close(self) -> None:
        """Detach from the model: it is as it was before (no hook, no patch left)."""
        for h in self._hooks + self._discovery_hooks:
            h.remove()
        self._hooks, self._discovery_hooks = [], []
        for module, previous in self._recordings:
            module.record_to(previous)
        self._recordings = []
        _uninstall(self)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside the block (a probe's) are neither recorded nor counted."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    # -- the forward --------------------------------------------------------------------------

    def batch_norm(self, owner: tuple[str, nn.Module], call: BatchNormCall) -> Tensor:
        """A training-mode F.batch_norm of a watched layer: computed and recorded."""
        input, running_mean, running_var, weight, bias, momentum, eps = call
        name, module = owner
        layer = self._layer(name, module, input.shape[1], eps, weight, momentum, input.device)
        # a layer that has buffers but trains without them (track_running_stats switched off
        # after it was built): its buffers as they are, which is what eval mode will use
        buffers = module._buffers
        layer.tensors = (
            running_mean if running_mean is not None else buffers.get("running_mean"),
            running_var if running_var is not None else buffers.get("running_var"),
            weight,
            bias,
        )
        layer.ran(input)
        if self._discovering:
            self._note_input(layer, input)
        # The very call torch.batch_norm makes (bit for bit torch's result, forward and
        # backward), which also hands back the batch mean and 1/sqrt(var + eps) it computed.
        y, mean, invstd, _, _ = torch._batch_norm_impl_index(
            input, weight, bias, running_mean, running_var, True, momentum, eps,
            torch.backends.cudnn.enabled,
        )  # fmt: skip
        layer.means.append(mean.detach())
        layer.invstds.append(invstd.detach())
        node = y.grad_fn
        if node is not None:  # measures on a measured step; counts where gamma does not
            by_gamma = layer.counted_by_gamma(weight)
            if self.measuring:
                m = input.numel() // input.shape[1]
                node.register_hook(_gradient_moments(layer, m, count=not by_gamma))
            elif not by_gamma:
                node.register_prehook(layer.count_backward)
        layer.last_output = (weakref.ref(y), y._version)
        return y

    def compiled_forward(
        self, key: int, mean: Tensor, invstd: Tensor, counts: tuple[int, int, bool], dtype: str,
        eps: float, momentum: float,
    ) -> bool:  # fmt: skip
        """A watched layer's forward in a compiled graph (bncore.record.compiled), as
        :meth:`batch_norm` records an eager one; False where ``key`` is not a module of ours."""
        hit = self._named.get(key)
        if hit is None:
            return False
        name, module = hit
        params, buffers = module._parameters, module._buffers
        weight = params.get("weight")
        layer = self._layer(name, module, mean.shape[0], eps, weight,
                            None if math.isnan(momentum) else momentum, mean.device)  # fmt: skip
        layer.tensors = (buffers.get("running_mean"), buffers.get("running_var"), weight,
                         params.get("bias"))  # fmt: skip
        layer.count(counts, getattr(torch, dtype.removeprefix("torch.")))
        layer.means.append(mean.detach().clone())  # the graph may reuse their memory
        layer.invstds.append(invstd.detach().clone())
        return True

    def compiled_grad(self, key: int, grad: Tensor, side: int) -> bool:
        """A gradient through a watched layer in a compiled graph: reaching its output (side
        0; a backward pass, counted where gamma does not count it) or leaving through its input
        (side 1); its moments on measured steps."""
        layer = self._by_module.get(key)
        if layer is None:
            return False
        if side == 0 and not layer.counted_by_gamma(layer.module._parameters.get("weight")):
            layer.backwards += 1
        if self.measuring:
            m = grad.numel() // grad.shape[1]
            found = layer.dy if side == 0 else layer.dx
            found.append((channel_moments(grad.detach(), -math.inf, math.inf), m))
        return True

    def own_layer(self, module: BatchNorm, input: Tensor) -> RecordTarget | None:
        """A training forward of bncore's own layer ``module``: the row it writes its
        statistics into (RECORD_ROWS, read at log), or None where nothing is recorded."""
        if not module.training or self._paused or _unseen() or input.numel() == 0:
            return None
        name = self._named.get(id(module), ("", module))[0]
        buffers, params = module._buffers, module._parameters
        layer = self._layer(name, module, module.num_features, module.eps, params["weight"],
                            module.momentum, input.device)  # fmt: skip
        layer.tensors = (buffers["running_mean"], buffers["running_var"], params["weight"],
                         params["bias"])  # fmt: skip
        layer.ran(input)
        c = input.shape[1]
        dtype = torch.promote_types(input.dtype, torch.float32)  # what its statistics are in
        row = torch.empty(len(RECORD_ROWS) * c, dtype=dtype, device=input.device)
        rows = row.view(len(RECORD_ROWS), c)
        act, grad = rows[RECORD_ACT : RECORD_ACT + 4], rows[RECORD_GRAD : RECORD_GRAD + 4]
        target = RecordTarget(row, act, grad, None)
        layer.written.append((target, input.numel() // c))
        if self._discovering:
            self._note_input(layer, input)
        return target

    def _own_output(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """bncore's own layer ran: its output, for the activation found after it."""
        layer = self._by_module.get(id(module))
        if layer is not None and module.training and not self._paused and not _unseen():
            layer.last_output = (weakref.ref(output), output._version)
            node = output.grad_fn
            if node is not None and not layer.counted_by_gamma(module._parameters["weight"]):
                node.register_prehook(layer.count_backward)

    # -- neighbours, found on the first forward -----------------------------------------------

    def _note_input(self, layer: _Layer, x: Tensor) -> None:
        """A BN ran in the first training forward: the Linear/Conv whose output it takes, the
        dropouts run since the last Linear/Conv, and whether it is the last BN so far."""
        hit = self._weight_outputs.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            w = hit[2]._parameters.get("weight")
            if isinstance(w, nn.Parameter):
                layer.weight = w
            layer.feeder_bias = hit[2]._parameters.get("bias") is not None
        if self._dropouts and layer.name not in self._dropout_before:
            self._dropout_before[layer.name] = max(self._dropouts)
        self._last_bn, self._weighted_after_bn = layer.name, False

    def _discover_dropout(self, module: nn.Module, args: tuple, output: Any) -> None:
        p = float(getattr(module, "p", 0.0))
        if module.training and p > 0 and not _unseen():
            self._dropouts.append(p)

    def _discover_pre(self, module: nn.Module, args: tuple) -> None:
        if not args or _unseen():
            return
        bounds = SATURATION[ACTIVATION_MODULES[type(module)]]
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
        if _unseen():
            return
        if isinstance(module, WEIGHTED) and isinstance(output, Tensor):
            self._weight_outputs[id(output)] = (weakref.ref(output), output._version, module)
            self._dropouts, self._weighted_after_bn = [], True
        if module is self.model and (self.layers or module.training):
            self._end_discovery()

    def _end_discovery(self) -> None:
        """After the first training forward: measure the activations found, note what was not
        (an eval-mode forward before it finds nothing, so discovery waits for training)."""
        frozen = self._frozen_bn()
        if frozen:
            self.notes["frozen_bn"] = (
                f"{len(frozen)} frozen batch norm layers ({', '.join(list(frozen)[:4])}"
                + (", ..." if len(frozen) > 4 else "")
                + "): fixed statistics, an affine map each step; kept once, in frozen_bn"
            )
        if not self.layers:
            self.notes["bn"] = "no batch norm ran in the model's first training forward"
            what = f"only {len(frozen)} frozen batch norm layers" if frozen else "any batch norm"
            warnings.warn(
                f"bnscope: {type(self.model).__name__} ran a training forward without {what}: "
                "nothing to record but the loss", stacklevel=2,
            )  # fmt: skip
        self._discovering = False
        self._output_layer = None if self._weighted_after_bn else self._last_bn
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

    def _activation_hook(self, layers: list[_Layer]) -> Callable[..., None]:
        """Measures the activation's output when its input is one of ``layers``' output."""
        bounds = layers[0].act_bounds
        lo, hi = bounds if bounds is not None else (-math.inf, math.inf)

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not (self.measuring and args) or self._paused or _unseen():
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
        statistics of every forward since the last log, on the device, as one row per step
        (what every step has: per layer, FREE, LIVE and SCALARS) and, on a measured step,
        references to what was measured (copied once, at flush)."""
        if not self.layers:
            return
        if self._discovering:  # the model's own forward never ran (Lightning's training_step)
            self._end_discovery()
        measured = self.measuring
        row: list[Tensor] = []
        more: list[list[Tensor] | None] = []
        counts: list[tuple[float, float]] = []
        host: list[tuple[float, ...]] = []
        for layer in self.layers.values():
            more.append(layer.take(measured, row))
            counts.append(layer.counts if measured else (math.nan, math.nan))
            host.append(layer.counted())
        self._rows.append(torch.cat(row))
        self._more.append(more if measured else None)
        self._counts.append(counts)
        self._host_counts.append(host)
        self.pending_steps.append(step)
        self.logged += 1
        self.measuring = self.logged % self.measure_interval == 0

    def _gather(self, layers: list[_Layer]) -> tuple[np.ndarray, np.ndarray]:
        """The pending steps on the host, in one transfer: (steps, every step's values) and
        (steps, measured values; NaN on the steps between). A layer that first ran after some
        steps is NaN on them."""
        width = max(r.numel() for r in self._rows)
        pieces: list[Tensor] = []
        for r in self._rows:
            pieces.append(r)
            if r.numel() < width:
                pieces.append(torch.full((width - r.numel(),), math.nan, device=r.device))
        is_measured = np.asarray([m is not None for m in self._more])
        for more in self._more:
            if more is not None:
                for i, layer in enumerate(layers):
                    have = more[i] if i < len(more) else None
                    pieces += have if have is not None else layer.placeholder()
        host = torch.cat([p.reshape(-1) for p in pieces]).to(torch.float32).cpu().numpy()
        n = len(self._rows)
        more_width = sum(len(MEASURED) * la.channels for la in layers)
        extra = np.full((n, more_width), np.nan, np.float32)
        extra[is_measured] = host[n * width :].reshape(-1, more_width)
        return host[: n * width].reshape(n, width), extra

    def flush(self) -> Records:
        """The pending steps, in one transfer, as ``layers`` and ``channels`` tables."""
        if not self.pending_steps:
            return Records()
        layers_now = list(self.layers.values())
        raw, extra = self._gather(layers_now)
        steps = np.asarray(self.pending_steps, np.int64)
        first = self.logged - len(steps)
        pad = [(math.nan, math.nan)] * len(layers_now)
        count = np.asarray([c + pad[len(c) :] for c in self._counts], np.float64)
        absent: list[tuple[float, ...]] = [_NO_COUNTS] * len(layers_now)
        host = np.asarray([h + absent[len(h) :] for h in self._host_counts], np.float64)
        self._rows, self._more, self._counts, self.pending_steps = [], [], [], []
        self._host_counts = []
        layout = [(la.name, la.channels, la.eps, la.affine) for la in layers_now]
        keep = core.kept(first, len(steps), self.channel_interval)
        return _tables(layout, raw, extra, count, host, steps, keep)

    def meta(self) -> dict[str, Any]:
        """What the run's layers are (for a sink's ``start``; it grows as layers first run):

        - ``layers``, ``channels``, ``tracked_units``, ``layer_kinds``, ``not_recorded``;
        - ``layer_config``: per recorded layer, its ``class``, ``momentum`` (None: the
          cumulative average), ``eps``, ``affine``, ``track_running_stats``, ``dtype`` (of its
          parameters and buffers) and ``input_dtype`` (of its last input; autocast's);
        - ``bn_modules``: every BN module of the model by module path, in module order,
          recorded or not (torch's BatchNorm/SyncBatchNorm and subclasses, bncore's,
          torchvision's FrozenBatchNorm2d; not InstanceNorm);
        - ``frozen_bn``: each frozen BN (FrozenBatchNorm2d: fixed buffers, no batch
          statistics) by module path, its ``class``, ``channels``, ``eps`` and its fixed
          statistics, as channel means: ``running_mean``, ``running_var``, ``gamma``, ``beta``,
          and the least and largest ``scale`` gamma / sqrt(running_var + eps);
        - ``structure``, once the first training forward is over: ``dropout_before`` (layer:
          the largest p of the Dropout modules run between the last Linear/Conv and it),
          ``output_layer`` (the last BN run, where no Linear/Conv ran after it; else None),
          ``zero_init_gamma`` (layers whose gamma was all zeros at their first forward),
          ``bias_before`` (layers whose feeding Linear/Conv has a bias), ``activation``
          (layer: the activation module taking its output, by bncore.record.core.SATURATION's
          names);
        - ``optimizer``, where one was given: its ``class``, ``norm_weight_decay`` (layer: the
          weight decay of the parameter group holding its gamma; 0.0 without one) and
          ``weight_decay`` (the largest over the groups holding the feeding Linear/Conv
          weights; None where no feeding weight was found);
        - ``distributed``: ``world`` (torch.distributed's world size, 1 without) and
          ``sync_bn`` (SyncBatchNorm layers in a process group of more than one process).
        """
        out: dict[str, Any] = {
            "layers": list(self.layers),
            "channels": [la.channels for la in self.layers.values()],
            "tracked_units": [[] for _ in self.layers],
            "layer_kinds": [type(la.module).__name__ for la in self.layers.values()],
            "not_recorded": dict(self.notes),
            "layer_config": {name: _layer_config(la) for name, la in self.layers.items()},
            "bn_modules": bn_modules(self.model),
            "frozen_bn": self._frozen_bn(),
            "distributed": _distributed(self.model),
        }
        if not self._discovering:
            out["structure"] = self._structure()
        if self.optimizers:
            out["optimizer"] = self._optimizer_facts()
        return out

    def _frozen_bn(self) -> dict[str, dict[str, Any]]:
        """:func:`frozen_batch_norms`, read once (fixed statistics: one read, one transfer each)."""
        if self._frozen is None:
            self._frozen = frozen_batch_norms(self.model)
        return self._frozen

    def _structure(self) -> dict[str, Any]:
        zero = []
        for name, la in self.layers.items():
            if isinstance(la.zero_gamma, Tensor):  # read once, here: no sync in the forward
                la.zero_gamma = bool(la.zero_gamma)
            if la.zero_gamma:
                zero.append(name)
        return {
            "dropout_before": dict(self._dropout_before),
            "output_layer": self._output_layer,
            "zero_init_gamma": zero,
            "bias_before": [name for name, la in self.layers.items() if la.feeder_bias],
            "activation": {
                name: ACTIVATION_MODULES[type(la.activation)]
                for name, la in self.layers.items()
                if la.activation is not None
            },
        }

    def _optimizer_facts(self) -> dict[str, Any]:
        decay: dict[int, float] = {}
        for opt in self.optimizers:
            for group in opt.param_groups:
                wd = float(group.get("weight_decay") or 0.0)
                for p in group["params"]:
                    decay[id(p)] = wd
        norm = {}
        for name, la in self.layers.items():
            gamma = (
                la.tensors[2] if la.tensors[2] is not None else la.module._parameters.get("weight")
            )
            norm[name] = decay.get(id(gamma), 0.0) if gamma is not None else 0.0
        feeding = [decay[id(la.weight)] for la in self.layers.values()
                   if la.weight is not None and id(la.weight) in decay]  # fmt: skip
        return {
            "class": ", ".join(type(opt).__name__ for opt in self.optimizers),
            "norm_weight_decay": norm,
            "weight_decay": max(feeding) if feeding else None,
        }


def is_batch_norm(module: nn.Module) -> bool:
    """A batch norm module: torch's (``_NormBase`` but InstanceNorm: BatchNorm1d/2d/3d, their
    lazy forms, SyncBatchNorm, subclasses), bncore's, or torchvision's FrozenBatchNorm2d
    (recognized by name: bncore imports no torchvision)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return not isinstance(module, nn.modules.instancenorm._InstanceNorm)
    return any(c.__name__ == "FrozenBatchNorm2d" for c in type(module).__mro__)


def bn_modules(model: nn.Module) -> list[str]:
    """The module paths of every batch norm module of ``model``, in module order (the model
    itself, if it is one, by its class name, as the watcher names it)."""
    return [name or type(m).__name__ for name, m in model.named_modules() if is_batch_norm(m)]


def frozen_batch_norms(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every frozen BN of ``model`` (a batch norm module with fixed buffers that computes no
    batch statistics: torchvision's and timm's FrozenBatchNorm2d) and its fixed statistics."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not is_batch_norm(m) or isinstance(m, nn.modules.batchnorm._NormBase | BatchNorm):
            continue
        b = m._buffers
        if any(not isinstance(b.get(k), Tensor) or not b[k].numel() for k in _FROZEN):
            continue
        eps = float(getattr(m, "eps", 1e-5))
        with torch.no_grad():
            mean, var, gamma, beta = (b[k].detach().double() for k in _FROZEN)
            scale = gamma * (var + eps).rsqrt()
            fixed = {"running_mean": mean.mean(), "running_var": var.mean(),
                     "gamma": gamma.mean(), "beta": beta.mean(),
                     "scale_min": scale.min(), "scale_max": scale.max()}  # fmt: skip
        out[name or type(m).__name__] = {
            "class": type(m).__name__, "channels": int(mean.numel()), "eps": eps,
            **{k: float(v) for k, v in fixed.items()},
        }  # fmt: skip
    return out


#: A frozen BN's buffers: its fixed statistics and affine map.
_FROZEN = ("running_mean", "running_var", "weight", "bias")


def _layer_config(layer: _Layer) -> dict[str, Any]:
    """A recorded layer's configuration: the module's attributes, else what its calls said."""
    m = layer.module
    rm, _, gamma, beta = layer.tensors
    momentum = getattr(m, "momentum", layer.momentum)
    tensors = [*m._parameters.values(), *m._buffers.values(), *layer.tensors]
    dtype = next((t.dtype for t in tensors if isinstance(t, Tensor) and t.is_floating_point()),
                 layer.input_dtype)  # fmt: skip
    return {
        "class": type(m).__name__,
        "momentum": None if momentum is None else float(momentum),
        "eps": float(layer.eps),
        "affine": bool(getattr(m, "affine", gamma is not None and beta is not None)),
        "track_running_stats": bool(getattr(m, "track_running_stats", rm is not None)),
        "dtype": _dtype_name(dtype),
        "input_dtype": _dtype_name(layer.input_dtype),
    }


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _distributed(model: nn.Module) -> dict[str, Any]:
    """The world size and whether SyncBatchNorm layers synchronize in it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {"world": 1, "sync_bn": False}
    world = torch.distributed.get_world_size()
    sync = any(
        isinstance(m, nn.SyncBatchNorm)
        and torch.distributed.get_world_size(m.process_group) > 1
        for m in model.modules()
    )  # fmt: skip
    return {"world": world, "sync_bn": sync}


def _tables(
    layout: list[tuple[str, int, float, tuple[bool, bool]]],
    raw: np.ndarray,
    extra: np.ndarray,
    count: np.ndarray,
    host: np.ndarray,
    steps: np.ndarray,
    keep: np.ndarray,
) -> Records:
    """``layers`` and ``channels`` tables of gathered steps (bncore.record.core). Layers of one
    width, eps and affine are summarized together, as (steps, layers, C) arrays; ``host``:
    (steps, layers, COUNTS) counted on the host."""
    # where each layer's values lie in raw (free, live, scalars) and extra (measured)
    at_free, at_more, at_live = [], [], []
    f = m = 0
    for _, c, _, _ in layout:
        at_free.append(f)
        at_live.append(f + len(FREE) * c)
        at_more.append(m)
        f += (len(FREE) + len(LIVE)) * c + len(SCALARS)
        m += len(MEASURED) * c
    groups = []
    for idx in core.layouts([(c, eps, affine) for _, c, eps, affine in layout]):
        _, c, eps, (gamma, beta) = layout[idx[0]]
        named, _ = core.layer_rows(raw, [at_free[j] for j in idx], FREE, c)
        named |= core.layer_rows(extra, [at_more[j] for j in idx], MEASURED, c)[0]
        named |= core.layer_rows(raw, [at_live[j] for j in idx], LIVE, c)[0]
        scalars = np.stack([raw[:, at_live[j] + len(LIVE) * c :][:, :2] for j in idx], 1)
        rows = {r: named[r] for r in RECORD_ROWS if r in named}
        with np.errstate(divide="ignore", invalid="ignore"):
            invstd = named["invstd"].astype(np.float64)  # var + eps - eps: keep digits
            rows["pre_var"] = (1.0 / np.square(invstd) - eps).astype(np.float32)
            for side, row, k in (("dy", "grad_out_sq", 0), ("dx", "grad_in_sq", 1)):
                counts = count[:, idx, k][..., None].astype(np.float32)
                rows[row] = counts * (named[f"{side}_var"] + np.square(named[f"{side}_mean"]))
        rows["post_mean"], rows["post_var"] = core.bn_output_rows(
            rows["pre_var"], rows["gamma"] if gamma else None,
            rows["beta"] if beta else None, eps,
        )  # fmt: skip
        columns = core.layer_columns(rows)
        columns["weight_grad_norm"] = scalars[..., 0]
        columns["layer_bias_grad_norm"] = np.full(scalars.shape[:2], np.nan, np.float32)
        columns["weight_norm"] = scalars[..., 1].astype(np.float32)
        for k, name in enumerate(COUNTS):
            columns[name] = host[:, idx, k].astype(np.float32)
        groups.append(core.LayerGroup(idx, rows, columns))
    return core.tables(steps, [name for name, *_ in layout], groups, keep)


def _gradient_moments(layer: _Layer, m: int, count: bool) -> Callable[..., None]:
    """A hook on BN's backward node: the moments of dy (reaching its output) and dx (leaving
    through its input), one fused reduction each; ``count``: the backward pass too."""

    def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]):
        if count:
            layer.backwards += 1
        for found, g in ((layer.dy, grad_outputs[0]), (layer.dx, grad_inputs[0])):
            if g is not None:
                found.append((channel_moments(g.detach(), -math.inf, math.inf), m))

    return hook


class _OwnLayer(Recording):
    """The watcher's :class:`~bncore.nn.byproducts.Recording` for one of bncore's own layers."""

    def __init__(self, watcher: Watcher, module: BatchNorm) -> None:
        super().__init__()
        self.watcher, self.module = watcher, module

    def target(self, input: Tensor) -> RecordTarget | None:
        return self.watcher.own_layer(self.module, input)


# -- the one patch: torch.nn.functional.batch_norm, while any watcher is attached --------------

_ORIGINAL = F.batch_norm
_ACTIVE: list[Watcher] = compiled.WATCHERS


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
        if not torch.compiler.is_compiling():
            return _train(input, running_mean, running_var, weight, bias, momentum, eps)
        # under torch.compile: a watched layer in the graph, recorded when it runs
        y = compiled.traced_batch_norm(input, running_mean, running_var, weight, bias, momentum,
                                       eps)  # fmt: skip
        if y is not None:
            return y
        if running_mean is None and running_var is None and weight is None and bias is None:
            # a BN without tensors, found by running: a graph break, recorded outside it
            return _train_outside_graph(input, None, None, None, None, momentum, eps)
    return _ORIGINAL(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _train(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """A training-mode batch norm: recorded by the watcher whose model owns its tensors (or,
    a BN with neither, is running it), else torch's own, unrecorded: another model, torch.func
    transforms, tracing, inference mode, an empty batch (it adds nothing to the statistics),
    an input torch refuses."""
    if _recordable(input, weight, bias, running_mean):
        for watcher in _ACTIVE:
            if watcher._paused:
                continue
            owner = watcher._owner(running_mean, weight, bias, running_var)
            if owner is None and running_mean is None and weight is None and bias is None:
                owner = watcher.bare_owner()
            if owner is None or not owner[1].training:
                continue
            if input.numel() == input.shape[1] or eps <= 0:
                break  # torch's own error message
            call = BatchNormCall(input, running_mean, running_var, weight, bias, momentum, eps)
            return watcher.batch_norm(owner, call)
    return _ORIGINAL(input, running_mean, running_var, weight, bias, True, momentum, eps)


# TorchScript compiles torch's own F.batch_norm where a module calls ours, so that scripting any
# model, while a watcher is attached or after, is as without BN Scope (torch.jit's hook:
# a function's __prepare_scriptable__ gives what to compile in its place).
_watched.__prepare_scriptable__ = lambda: _ORIGINAL  # type: ignore[attr-defined]

# A graph break under torch.compile: _train runs (recorded) eagerly. torch's own lazy form of
# torch.compiler.disable, which loads dynamo on the first compiled call instead of at import
# (3 s on every script that imports bnscope.client, compiled or not).
_train_outside_graph = torch._compile._disable_dynamo(_train)


def _install(watcher: Watcher) -> None:
    compiled.define_operators()
    if not _ACTIVE:
        F.batch_norm = _watched
    _ACTIVE.append(watcher)


def _uninstall(watcher: Watcher) -> None:
    if watcher in _ACTIVE:
        _ACTIVE.remove(watcher)
    if not _ACTIVE and F.batch_norm is _watched:
        F.batch_norm = _ORIGINAL

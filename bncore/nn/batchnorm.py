r"""BatchNorm1d/2d/3d: drop-in replacements for torch.nn's, that also report what they computed.

Same constructor arguments, buffers, parameters, state_dict keys, train/eval behaviour and
results as :class:`torch.nn.BatchNorm2d` and friends:

.. math::
    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

In training mode the statistics are the batch's (biased variance), and the running buffers move
towards them by ``momentum`` (the running variance takes the unbiased batch variance); with
``momentum=None`` they are the cumulative average over all batches. In eval mode the running
buffers normalize, unless ``track_running_stats=False``.

After every training-mode forward and backward, ``layer.stats``
(:class:`~bncore.nn.byproducts.BNStats`) holds the per-channel batch statistics and gradient sums
the layer computed anyway.

Keras users: ``BatchNorm2d.from_keras(C, momentum=0.99, epsilon=1e-3)`` builds a layer that
behaves as ``keras.layers.BatchNormalization`` does (see :meth:`BatchNorm.from_keras`).
"""

from __future__ import annotations

import operator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import init

from bncore.nn import kernels
from bncore.nn.byproducts import BNStats, Capture, Recording
from bncore.nn.functional import batch_norm_with_stats
from bncore.nn.kernels import reference
from bncore.nn.kernels.reference import Running

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "keras_momentum_to_torch",
    "under_transform",
]

B = TypeVar("B", bound="BatchNorm")
is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def under_transform(input: Tensor) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running, or ``input`` comes
    from one. Transforms reach parameters as well as inputs (functional_call with grad or vmap over
    the parameters: the input stays a plain tensor), and reject an autograd.Function met anywhere
    under them, so the test is on the transform, not only on the input."""
    return torch._C._are_functorch_transforms_active() or is_functorch_wrapped(input)


def keras_momentum_to_torch(momentum: float) -> float:
    """Keras momentum weighs the old running value; torch momentum weighs the new batch value."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"Keras momentum must lie in [0, 1], got {momentum}")
    return 1.0 - momentum


class BatchNormBase(nn.modules.batchnorm._BatchNorm):
    """Parameters and running buffers, named and initialised as in torch.nn: what every
    normalization by batch statistics shares (:class:`BatchNorm`, and the variants of
    bncore.nn.norms).

    The order follows torch's (``_NormBase`` -> ``_BatchNorm``), one step further down: this
    is a subclass of torch's own ``_BatchNorm``, so that what recognizes torch's BN layers
    recognizes bncore's too (``nn.SyncBatchNorm.convert_sync_batchnorm``,
    ``torch.func.replace_all_batch_norm_modules_``, a user's ``isinstance`` check for freezing
    BN); everything it does is defined here.
    """

    _version = 2
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    # None without gamma/beta (affine=False, Keras' scale/center=False); torch leaves them
    # undeclared, so mypy infers Parameter from its _NormBase.__init__
    weight: nn.Parameter | None  # type: ignore[assignment]  # torch's inferred type: Parameter
    bias: nn.Parameter | None  # type: ignore[assignment]  # torch's inferred type: Parameter
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        nn.Module.__init__(self)  # torch's _NormBase.__init__ registers its own way
        try:
            num_features = operator.index(num_features)
        except TypeError:
            raise TypeError(f"num_features must be an int, got {num_features!r}") from None
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1] or be None, got {momentum}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0."""
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset, gamma = 1, beta = 0."""
        self.reset_running_stats()
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _running_factor(self) -> float | Tensor:
        """Counts a training batch; the weight of its statistics in the running buffers:
        ``momentum``, or 1/k for the cumulative average (a tensor: no host sync)."""
        count = self._buffers["num_batches_tracked"]
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if count is not None:
            count.add_(1)
            if self.momentum is None:
                running_mean = self._buffers["running_mean"]
                assert running_mean is not None  # registered alongside num_batches_tracked
                factor = count.to(running_mean.dtype).reciprocal()
        return factor

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Version 1 state_dicts (torch < 0.4.1) have no num_batches_tracked: it starts at 0.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNorm(BatchNormBase):
    r"""Batch normalization over dim 1 of an ``(N, C, *)`` input; :class:`BatchNorm1d`,
    :class:`BatchNorm2d` and :class:`BatchNorm3d` only check the input's rank.

    Args: as :class:`torch.nn.BatchNorm2d` (``num_features``, ``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, ``device``, ``dtype``), and ``bias=False`` for a scale
    without a shift.

    Shape: input and output ``(N, C, *)``. Besides the output, each training forward leaves
    ``stats`` (:class:`~bncore.nn.byproducts.BNStats`), and writes what its :class:`Recording`
    asks for (:meth:`record_to`).

    Example::

        >>> layer = bncore.BatchNorm2d(16)
        >>> y = layer(torch.randn(8, 16, 4, 4))
        >>> layer.stats.mean.shape
        torch.Size([16])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unbiased_running_var = True
        self.stats = BNStats()
        self.recording: Recording | None = None  # see record_to
        # FrozenBN (Wu & Johnson 2021): in training too, normalize with the running statistics
        # and leave them as they are; the gradient flows through gamma and beta
        self.frozen = False

    #: The input ranks a subclass takes, with their shape as the error message names it (None:
    #: any rank from 2 on).
    ranks: tuple[tuple[int, str], ...] | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        ranks, dim = self.ranks, input.dim()
        if ranks is None and dim < 2:
            raise ValueError(
                f"expected at least 2D input (N, C, ...), got {dim}D input of shape "
                f"{tuple(input.shape)}"
            )
        if ranks is not None and dim not in dict(ranks):
            expected = " or ".join(f"{d}D {shape}" for d, shape in ranks)
            raise ValueError(
                f"expected {expected} input (got {dim}D input of shape {tuple(input.shape)})"
            )

    def record_to(self, recording: Recording | None) -> Recording | None:
        """Have ``recording`` (bncore.record) say, at each training forward, what this layer
        measures and where it writes it; None: record nothing beyond ``stats``. Returns the
        recording it had, for whoever wants to put it back."""
        previous, self.recording = self.recording, recording
        return previous

    @classmethod
    def from_keras(
        cls: type[B],
        num_features: int,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> B:
        r"""A layer with Keras 3's ``keras.layers.BatchNormalization`` arguments and behaviour.

        Keras' ``momentum`` is the weight of the old running value
        (``moving = moving * momentum + batch * (1 - momentum)``), so torch's momentum is
        ``1 - momentum``; Keras 3 (and tf.keras' non-fused path) feeds the *biased* batch
        variance to the moving variance, and defaults to ``epsilon=1e-3``. tf.keras 2.x's fused
        path applies Bessel's correction there, as torch does: for it, build the torch
        convention with ``momentum=keras_momentum_to_torch(m)`` and ``eps=1e-3``.
        ``center``/``scale`` switch beta/gamma off separately.
        Parameter and buffer names stay torch's (gamma is ``weight``, moving_mean is
        ``running_mean``).
        """
        layer = cls(
            num_features,
            eps=epsilon,
            momentum=keras_momentum_to_torch(momentum),
            affine=center or scale,
            device=device,
            dtype=dtype,
            bias=center,
        )
        if not scale and layer.weight is not None:
            layer.weight = None
        layer.unbiased_running_var = False
        return layer

    def extra_repr(self) -> str:
        keras = "" if self.unbiased_running_var else ", running_var=biased (Keras)"
        return super().extra_repr() + keras

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input with {input.shape[1]} "
                f"channels (shape {tuple(input.shape)}); dim 1 must be the channels"
            )
        # Straight from the registries: nn.Module.__getattr__ costs microseconds per layer call.
        params, buffers = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        frozen = not self.training or self.frozen
        if frozen and running_mean is not None and running_var is not None:
            return batch_norm_with_stats(
                input, running_mean, running_var, weight, bias, False, 0.0, self.eps
            )
        if torch.compiler.is_compiling() or under_transform(input):
            return self._traceable_forward(input, weight, bias, running_mean, running_var)
        running = None
        if self.training and self.track_running_stats and running_mean is not None:
            assert running_var is not None
            running = Running(
                running_mean, running_var, self._running_factor(), self.unbiased_running_var
            )
        keep = Capture.of(self.stats, self.recording, input)
        return kernels.training_batch_norm(input, weight, bias, self.eps, running, keep)

    def _traceable_forward(
        self,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
    ) -> Tensor:
        """Training mode under torch.compile or torch.func transforms, which bncore's fused
        operators do not support: torch's own batch norm (the same math), not recorded; Keras'
        biased running variance in plain torch operations."""
        running = running_mean is not None and self.track_running_stats
        factor = self._running_factor() if running else 0.0
        if isinstance(factor, Tensor):  # the cumulative average, as torch.nn computes it
            count = self._buffers["num_batches_tracked"]
            assert count is not None  # a tensor factor comes from counting batches
            factor = 1.0 / float(count)
        if self.unbiased_running_var or not running:
            return torch.batch_norm(
                input, weight, bias, running_mean if running else None,
                running_var if running else None, True, factor, self.eps,
                torch.backends.cudnn.enabled,
            )  # fmt: skip
        assert running_mean is not None and running_var is not None
        out = reference.normalize_batch(input, weight, bias, self.eps)
        reference.update_running(
            Running(running_mean, running_var, factor, False),
            out.mean.detach(), out.var.detach(), reference.values_per_channel(input),
        )  # fmt: skip
        return out.y


class BatchNorm1d(BatchNorm):
    r"""Batch normalization of a 2D ``(N, C)`` or 3D ``(N, C, L)`` input, per channel C."""

    ranks = ((2, "(N, C)"), (3, "(N, C, L)"))


class BatchNorm2d(BatchNorm):
    r"""Batch normalization of a 4D ``(N, C, H, W)`` input, per channel C over N, H and W."""

    ranks = ((4, "(N, C, H, W)"),)


class BatchNorm3d(BatchNorm):
    r"""Batch normalization of a 5D ``(N, C, D, H, W)`` input, per channel C."""

    ranks = ((5, "(N, C, D, H, W)"),)

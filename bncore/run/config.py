"""What a run is: one pydantic model, used alike by the trainer, the CLI, the API and the dashboard.

A :class:`RunConfig` names the model, its normalization, the data, the optimizer and the
schedule; every field has a default, a range and a description (``bnscope train --help`` prints
them all). Validation errors name the field (``optim.lr``) and the allowed range. Limits keep a
run within what one machine can train and store (bncore.run.budget's, counted on the network).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

__all__ = [
    "RUN_RULES",
    "UNKNOWN_FIELD",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "FieldPathError",
    "ModelConfig",
    "NormConfig",
    "OptimConfig",
    "RunConfig",
    "describe_fields",
    "field_errors",
    "get_field",
    "grouped",
    "leaf_fields",
    "load_config",
    "set_field",
    "summarize",
]

#: What DataConfig.name accepts.
DatasetName = Literal[
    "mnist1d", "digits", "blobs", "spirals", "gaussian", "mnist", "fashion_mnist", "cifar10"
]
SPATIAL_DATASETS = ("mnist1d", "digits", "mnist", "fashion_mnist", "cifar10")
FILE_DATASETS = ("mnist", "fashion_mnist", "cifar10")

KERAS_DEFAULTS = {"momentum": 0.99, "eps": 1e-3}
PYTORCH_DEFAULTS = {"momentum": 0.1, "eps": 1e-5}


#: What the CLI, the API and the dashboard say of a field that a config does not have.
UNKNOWN_FIELD = "unknown field (check the spelling)"


class FieldsError(ValueError):
    """A rule over several fields broken (a model validator's): ``fields`` names each field
    involved, dotted and relative to the model that checks it, so that the error can be shown
    beside each of them (see :func:`field_errors`)."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


#: Rules of a whole run that need more than its fields, each called with the RunConfig after its
#: own rules and raising FieldsError: bncore.run.budget adds the limits on one run's size, counted
#: on the real network, which is built from this module's classes (so this module cannot import
#: the budget); importing bncore.run adds them, wherever a RunConfig is made.
RUN_RULES: list[Callable[[RunConfig], None]] = []


class _Strict(BaseModel):
    # strict: a JSON "64" is not silently the number 64 (ints are still floats); files and
    # --set overrides, which are text, are read leniently (load_config)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(_Strict):
    """The network: a stack of blocks (linear or conv, normalization, activation), then a
    linear classifier. Blocks are named block0, block1, ... with or without normalization."""

    kind: Literal["mlp", "cnn", "resnet"] = Field(
        default="mlp",
        description="fully connected, convolutional, or residual: He et al.'s CIFAR "
        "ResNet-(6n+2), n = depth (a stem, three stages of n residual blocks at width, "
        "2 width and 4 width channels, pooling, a linear classifier)",
    )
    depth: int = Field(
        default=4,
        ge=1,
        le=100,
        description="number of hidden blocks; resnet: residual blocks per stage (n of "
        "ResNet-(6n+2): 3 gives ResNet-20)",
    )
    width: int = Field(
        default=128,
        ge=1,
        le=4096,
        description="units per hidden layer (MLP), channels (CNN), channels of the first "
        "stage (resnet; He et al.: 16)",
    )
    residual: Literal["post", "pre"] = Field(
        default="post",
        description="resnet: post-activation blocks (He et al. 2016a: conv-norm-ReLU-conv-norm,"
        " ReLU after the sum) or pre-activation (He et al. 2016b: norm-ReLU-conv twice, "
        "nothing after the sum)",
    )
    zero_init_residual: bool = Field(
        default=False,
        description="resnet: the last normalization of each residual branch starts with gamma"
        " = 0, so every block starts as the identity (Goyal et al. 2017)",
    )
    shortcut: Literal["zero_pad", "projection"] = Field(
        default="zero_pad",
        description="resnet: the shortcut of a stage's first block, where the resolution halves "
        "and the channels double: zero_pad (He et al.'s option A, no parameters: every other "
        "position, the new channels zero, so the stream's average channel variance halves) or "
        "projection (a 1x1 convolution with its own normalization, as in Brock et al. 2021's "
        "networks: norm-ReLU-conv in a pre-activation network, conv-norm in a post-activation "
        "one; the variance resets to about 1)",
    )
    skip_init: bool = Field(
        default=False,
        description="resnet: each residual branch is scaled by a learnable scalar that starts "
        "at 0 (SkipInit, De & Smith 2020; trains deep networks without normalization)",
    )
    activation: Literal["relu", "tanh", "sigmoid", "linear"] = Field(
        default="relu", description="nonlinearity after each block's normalization (or before it)"
    )
    bias: bool | None = Field(
        default=None,
        description="bias in each linear/conv layer; default: off where a normalization "
        "directly follows it (its mean subtraction cancels the bias), on otherwise",
    )


class NormConfig(_Strict):
    """The normalization in each block. ``kind`` selects the layer (bncore.run.models.NORMS builds
    it); the fields after ``eps`` belong to one kind each."""

    kind: Literal["none", "batch", "ghost", "renorm", "noisy", "group", "layer"] = Field(
        default="batch",
        description="batch (BN); ghost (BN over virtual batches); renorm (batch renormalization);"
        " noisy (BN, then a per-channel shift and scale redrawn every step); group (GroupNorm);"
        " layer (LayerNorm: GroupNorm with one group); none",
    )
    placement: Literal["before_activation", "after_activation"] = Field(
        default="before_activation",
        description="BN between the linear/conv layer and the activation (Ioffe & Szegedy), "
        "or after the activation",
    )
    convention: Literal["pytorch", "keras"] = Field(
        default="pytorch",
        description="meaning and defaults of momentum and eps: pytorch (momentum 0.1 weighs the "
        "new batch, eps 1e-5, unbiased running variance) or keras (momentum 0.99 weighs the old "
        "value, eps 1e-3, biased running variance)",
    )
    momentum: float | Literal["cumulative"] | None = Field(
        default=None,
        description="running-statistics momentum in the chosen convention; 'cumulative' for "
        "the cumulative average (pytorch only); default: the convention's",
    )
    eps: float | None = Field(
        default=None, gt=0, le=1, description="added to the variance; default: the convention's"
    )
    virtual_batch: int | None = Field(
        default=None,
        ge=2,
        le=8192,
        description="kind 'ghost': examples per virtual batch; must divide batch_size; default: "
        "the largest divisor of batch_size up to 32",
    )
    r_max: float = Field(
        default=3.0, ge=1, le=100, description="kind 'renorm': bound of the scale r"
    )
    d_max: float = Field(
        default=5.0, ge=0, le=100, description="kind 'renorm': bound of the shift d"
    )
    noise_shift: float = Field(
        default=0.5,
        ge=0,
        le=100,
        description="kind 'noisy': each step's per-channel mean of the noise is drawn from "
        "U(-noise_shift, +); each activation's own noise has this standard deviation",
    )
    noise_scale: float = Field(
        default=1.5,
        ge=1,
        le=100,
        description="kind 'noisy': each step's per-channel scale is drawn from U(1, noise_scale)",
    )
    freeze_after: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="kind 'batch': FrozenBN (Wu & Johnson 2021) after this share of the steps: "
        "BN normalizes with its population statistics (recomputed by PreciseBN where "
        "precise_bn is set, else the running ones) and stops updating them; the per-layer "
        "statistics are not recorded from then on (BN computes no batch statistics); "
        "default: never",
    )
    groups: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="kind 'group': channel groups; must divide model.width; default: the largest"
        " divisor of model.width up to 32 that leaves at least 4 channels per group",
    )

    @model_validator(mode="after")
    def _check(self) -> NormConfig:
        if isinstance(self.momentum, float) and not 0.0 <= self.momentum <= 1.0:
            raise FieldsError(f"momentum must lie in [0, 1], got {self.momentum}", "momentum")
        if self.freeze_after is not None and self.kind != "batch":
            raise FieldsError(
                f"freeze_after (FrozenBN) applies to kind 'batch', not {self.kind!r}",
                "freeze_after",
                "kind",
            )
        if self.momentum == "cumulative" and self.convention == "keras":
            raise FieldsError(
                "momentum 'cumulative' exists only in the pytorch convention",
                "momentum",
                "convention",
            )
        return self

    def resolved(self) -> tuple[float | None, float]:
        """(torch momentum, eps): None momentum means the cumulative average."""
        defaults = KERAS_DEFAULTS if self.convention == "keras" else PYTORCH_DEFAULTS
        eps = defaults["eps"] if self.eps is None else self.eps
        if self.momentum == "cumulative":
            return None, eps
        m = defaults["momentum"] if self.momentum is None else float(self.momentum)
        return (1.0 - m if self.convention == "keras" else m), eps

    def resolved_groups(self, width: int) -> int:
        """GroupNorm's groups for ``width`` channels: 1 for LayerNorm."""
        if self.kind == "layer":
            return 1
        if self.groups is not None:
            return self.groups
        return largest_divisor(width, max(1, min(32, width // 4)))

    def resolved_virtual_batch(self, batch_size: int) -> int:
        """Ghost BN's virtual batch size for ``batch_size``."""
        if self.virtual_batch is not None:
            return self.virtual_batch
        return largest_divisor(batch_size, 32)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most``."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


class DataConfig(_Strict):
    """The dataset, made or read locally: nothing is downloaded."""

    name: DatasetName = Field(
        default="mnist1d",
        description="mnist1d (Greydanus 2020, made offline), digits (scikit-learn, 8x8), "
        "blobs and spirals (synthetic, 2-d), gaussian (N(0, I) inputs of 'features' "
        "dimensions, labelled by a random linear teacher: full-rank batches, as mean field "
        "theory assumes), or mnist/fashion_mnist (IDX files) and cifar10 (python batches) "
        "read from 'path'",
    )
    path: str | None = Field(
        default=None, description="directory holding the files of mnist, fashion_mnist or cifar10"
    )
    samples: int = Field(
        default=4000,
        ge=20,
        le=200_000,
        description="number of examples to make (blobs, spirals, gaussian)",
    )
    classes: int = Field(
        default=4, ge=2, le=20, description="number of classes (blobs, spirals, gaussian)"
    )
    features: int = Field(default=256, ge=1, le=4096, description="input dimensions (gaussian)")
    noise: float = Field(default=0.2, ge=0, le=10, description="noise level (blobs, spirals)")
    test_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="share held out for testing where the data has no split",
    )
    split_seed: int = Field(
        default=0,
        ge=0,
        description="seed of the train/test split and of synthetic data (fixed, so "
        "runs with different training seeds see the same data)",
    )
    max_train: int | None = Field(
        default=None, ge=2, description="use at most this many training examples"
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.name in FILE_DATASETS and not self.path:
            raise FieldsError(
                f"data.name={self.name!r} is read from files: set data.path", "path", "name"
            )
        return self


class OptimConfig(_Strict):
    """The optimizer."""

    name: Literal["sgd", "adam"] = Field(default="sgd", description="SGD with momentum, or Adam")
    lr: float = Field(default=0.05, gt=0, le=100, description="learning rate")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum (ignored by Adam)")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="L2 weight decay")
    norm_weight_decay: bool = Field(
        default=True,
        description="apply weight_decay to the normalization layers' gamma and beta too "
        "(false: as is common, they are left out)",
    )
    schedule: Literal["constant", "cosine", "step"] = Field(
        default="constant",
        description="the learning rate after warmup: constant, cosine decay to 0 at the last "
        "step (Loshchilov & Hutter 2017), or step decay by gamma at the milestones",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="steps over which the learning rate rises linearly from lr/warmup_steps "
        "to lr (Goyal et al. 2017); 0: none",
    )
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        max_length=16,
        description="schedule 'step': the shares of the run's steps after which the learning "
        "rate is multiplied by gamma (He et al. 2016: 0.5, 0.75)",
    )
    gamma: float = Field(
        default=0.1, gt=0, le=1, description="schedule 'step': the factor at each milestone"
    )

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(
            set(self.milestones)
        ):
            raise FieldsError(
                f"optim.milestones={list(self.milestones)} must be increasing shares of the "
                "run's steps, each between 0 and 1",
                "milestones",
            )
        return self

    def lr_factor(self, step: int, steps: int) -> float:
        """The learning rate of (1-based) ``step`` of ``steps``, as a multiple of ``lr``."""
        if self.warmup_steps and step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.schedule == "cosine":
            done = (step - 1 - self.warmup_steps) / max(1, steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        if self.schedule == "step":
            return self.gamma ** sum(step > m * steps for m in self.milestones)
        return 1.0


class DistributedConfig(_Strict):
    """One run over several processes: the model trained data-parallel (torch.distributed's
    DistributedDataParallel; gloo on the CPU, NCCL with a GPU per process), ``batch_size``
    being the global batch, split evenly."""

    replicas: int = Field(
        default=1,
        ge=1,
        le=8,
        description="processes that train the one model, each on its share of every batch",
    )
    sync_bn: bool = Field(
        default=False,
        description="normalize with the global batch's statistics (bncore's synchronized BN: "
        "one all-gather per BN layer and step) rather than each replica's own (the default of "
        "DistributedDataParallel); norm.kind 'batch' only",
    )


class RunConfig(_Strict):
    """One training run."""

    name: str | None = Field(default=None, max_length=200, description="a label for the run")
    model: ModelConfig = Field(default_factory=ModelConfig)
    norm: NormConfig = Field(default_factory=NormConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    batch_size: int = Field(
        default=64,
        ge=2,
        le=8192,
        description="examples per training step (over all replicas: the global batch)",
    )
    steps: int = Field(default=1000, ge=1, le=1_000_000, description="training steps")
    eval_interval: int = Field(
        default=100, ge=1, description="steps between evaluations (train/test loss and accuracy)"
    )
    stats_interval: int = Field(
        default=1,
        ge=1,
        description="steps between recorded statistics (every layer, every statistic)",
    )
    channel_interval: int = Field(
        default=10,
        ge=1,
        description="keep per-channel arrays every this many recorded steps (summaries are "
        "kept at every recorded step)",
    )
    tracked_units: int = Field(
        default=3,
        ge=1,
        le=16,
        description="units per layer whose 15/50/85th percentiles are recorded",
    )
    ics_interval: int = Field(
        default=0,
        ge=0,
        description="steps between measurements of internal covariate shift (Santurkar et al."
        "): one extra forward and backward per block; a multiple of stats_interval; 0: off",
    )
    landscape: bool = Field(
        default=False,
        description="at every evaluation, the loss and gradient along the gradient direction "
        "at 0.5-4 learning rates (Santurkar et al.'s landscape and beta-smoothness)",
    )
    precise_bn: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="at every evaluation, recompute each BN's population statistics from this "
        "many training batches, the model frozen (PreciseBN, Wu & Johnson 2021): their gap to "
        "the EMA running statistics, and test accuracy with them and in training mode; 0: off",
    )
    eval_gaps: bool = Field(
        default=False,
        description="at every evaluation, each BN's eval-mode input of the mode-gap probe "
        "batch against its running statistics (eval_mean_gap, eval_var_gap per block): the "
        "layer where eval mode first parts from training",
    )
    seed: int = Field(default=0, ge=0, description="seed of initialization and batch order")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where to train: auto picks cuda when available"
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.model.kind in ("cnn", "resnet") and self.data.name not in SPATIAL_DATASETS:
            raise FieldsError(
                f"model.kind={self.model.kind!r} needs data with spatial structure "
                f"({', '.join(SPATIAL_DATASETS)}), not data.name={self.data.name!r}",
                "model.kind",
                "data.name",
            )
        if self.model.shortcut != "zero_pad" and self.model.kind != "resnet":
            raise FieldsError(
                f"model.shortcut={self.model.shortcut!r} is the shortcut of a residual network's "
                f"stage transitions: model.kind must be 'resnet', not {self.model.kind!r}",
                "model.shortcut",
                "model.kind",
            )
        replicas = self.distributed.replicas
        if self.batch_size % replicas:
            raise FieldsError(
                f"batch_size={self.batch_size} must split evenly over distributed.replicas="
                f"{replicas} (each replica trains on batch_size / replicas examples)",
                "batch_size",
                "distributed.replicas",
            )
        if self.distributed.sync_bn and self.norm.kind != "batch":
            raise FieldsError(
                f"distributed.sync_bn synchronizes batch normalization: norm.kind must be "
                f"'batch', not {self.norm.kind!r}",
                "distributed.sync_bn",
                "norm.kind",
            )
        if self.ics_interval % self.stats_interval:
            raise FieldsError(
                f"ics_interval={self.ics_interval} must be a multiple of stats_interval="
                f"{self.stats_interval} (internal covariate shift is recorded with the step's "
                "statistics)",
                "ics_interval",
                "stats_interval",
            )
        width, norm = self.model.width, self.norm
        if norm.kind == "group" and width % norm.resolved_groups(width):
            raise FieldsError(
                f"norm.groups={norm.groups} must divide model.width={width} (GroupNorm splits "
                "the channels into equal groups)",
                "norm.groups",
                "model.width",
            )
        if norm.kind == "group" and self.model.kind == "mlp" and norm.groups == width:
            raise FieldsError(
                f"norm.groups={norm.groups} leaves one channel per group: in an MLP each group "
                "would be a single value, normalized to zero; use fewer groups",
                "norm.groups",
                "model.width",
            )
        if norm.kind == "ghost" and self.batch_size % norm.resolved_virtual_batch(self.batch_size):
            raise FieldsError(
                f"norm.virtual_batch={norm.virtual_batch} must divide batch_size={self.batch_size}",
                "norm.virtual_batch",
                "batch_size",
            )
        for rule in RUN_RULES:
            rule(self)
        return self


class ConfigError(ValueError):
    """A config that does not validate; ``errors`` lists (field path, message), one entry per
    field involved (a rule over two fields gives two entries with the same message)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__(summarize(errors))


def field_errors(
    errors: Iterable[Mapping[str, Any]], strip: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """(dotted field, message) for each of pydantic's errors (``ValidationError.errors()``, or
    FastAPI's), worded alike for the CLI, the API and the dashboard: an unknown field says
    :data:`UNKNOWN_FIELD`; a rule over several fields (:class:`FieldsError`) gives one entry per
    field; a number sent as a string says so. ``strip``: a leading location to drop (the API's
    ``"body"``); the field is "" for the whole input."""
    out: list[tuple[str, str]] = []
    for e in errors:
        loc = tuple(e.get("loc") or ())
        if strip and loc[: len(strip)] == strip:
            loc = loc[len(strip) :]
        field = ".".join(str(p) for p in loc if not str(p).startswith("function-"))
        kind, given = e.get("type"), e.get("input")
        cause = (e.get("ctx") or {}).get("error")
        message = str(e.get("msg", "")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            message = UNKNOWN_FIELD
        elif kind in ("int_type", "float_type") and isinstance(given, str):  # strict
            message = f"expected a number, not the string {given!r} (write numbers without quotes)"
        elif kind in ("int_parsing", "float_parsing"):  # text that is no number
            message = f"expected a number, not {given!r}"
        elif kind == "bool_type" and isinstance(given, str):
            message = f"expected true or false, not the string {given!r}"
        if isinstance(cause, FieldsError) and cause.fields:
            out.extend((".".join(filter(None, (field, f))), message) for f in cause.fields)
        else:
            out.append((field, message))
    return out


def grouped(errors: Iterable[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(fields, message) per distinct message, in order: a rule over two fields is one entry."""
    fields: dict[str, dict[str, None]] = {}  # dicts as ordered sets: linear in the errors
    for field, message in errors:
        fields.setdefault(message, {})[field] = None
    return [(list(names), message) for message, names in fields.items()]


def summarize(errors: Iterable[tuple[str, str]]) -> str:
    """The errors in one line, ``field: message; ...``; a message shared by several fields is
    said once, after all of them."""
    return "; ".join(
        f"{', '.join(names)}: {message}" if any(names) else message
        for names, message in ((list(filter(None, n)), m) for n, m in grouped(errors))
    )


def parse_config(data: dict[str, Any], strict: bool = True) -> RunConfig:
    """A RunConfig from plain data; raises ConfigError naming each bad field. ``strict=False``
    reads numbers written as strings (text input: files, ``--set``) as numbers."""
    try:
        return RunConfig.model_validate(data, strict=None if strict else False)
    except ValidationError as exc:
        raise ConfigError([(f or "config", m) for f, m in field_errors(exc.errors())]) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a JSON or YAML file, apply ``key.path=value`` overrides, and validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([("config", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([("config", f"{path} is not valid JSON/YAML: {exc}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("config", f"{path} must hold a mapping of fields")])
    for item in overrides or []:
        apply_override(data, item)
    return parse_config(data, strict=False)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b=value`` in nested ``data``; the value is parsed as YAML (numbers, null, ...)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError([("--set", f"expected key.path=value, got {item!r}")])
    try:
        set_field(data, key.strip(), yaml.safe_load(raw))
    except FieldPathError as exc:
        raise ConfigError([(key, exc.reason)]) from None


def leaf_fields(
    model: type[BaseModel] = RunConfig, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, pydantic field) of every field that holds a value, not a group of fields,
    in the order of the model: what ``bnscope train --help`` lists and the dashboard's form
    draws."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def describe_fields(model: type[BaseModel] = RunConfig) -> list[str]:
    """One line per field: dotted name, type, default, range and description."""
    lines = []
    for path, field in leaf_fields(model):
        rng = [
            f"{k}{getattr(m, a)}"
            for m in field.metadata
            for k, a in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt"))
            if getattr(m, a, None) is not None
        ]
        kind = str(field.annotation).replace("typing.", "").replace("Literal", "one of ")
        default = field.get_default(call_default_factory=True)
        lines.append(
            f"  {path:24s} {kind}; default {default!r}"
            f"{'; ' + ', '.join(rng) if rng else ''}\n      {field.description or ''}"
        )
    return lines


def get_field(config: dict[str, Any], dotted: str) -> Any:
    """The value of a dotted field (``optim.lr``) in a config dict, or None."""
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class FieldPathError(ValueError):
    """A dotted field that passes through a value rather than a group of fields (``a.b`` where
    ``a`` is a number): ``field``, the dotted name; ``reason``, what is wrong with it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field!r}: {reason}")
        self.field, self.reason = field, reason


def set_field(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets a dotted field (``optim.lr``) in a config dict, making the groups it needs; a
    :class:`FieldPathError` where the path goes through a value. The one way a dotted name is
    set: ``--set`` overrides, sweep points and the dashboard's form all come through here."""
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise FieldPathError(dotted, f"{p} is not a group of fields")
    node[leaf] = value

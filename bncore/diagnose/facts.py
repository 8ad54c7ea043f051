"""What the doctor knows about a run beyond its records: each BN layer's configuration, the
network's structure, the optimizer, data parallelism. Read from the run's meta, in either of
the two shapes a run has one:

- a run of bncore's own engine (``bnscope train``, a server worker): ``meta["config"]``, the
  RunConfig, from which every layer's configuration follows;
- a user's model under ``watch()`` (bnscope.client, Lightning): ``layer_config``,
  ``bn_modules``, ``structure``, ``optimizer`` and ``distributed``, found by the watcher.

Whatever a meta does not say stays None: a rule that needs it says it could not check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bncore.run.config import NormConfig

__all__ = ["LayerFacts", "RunFacts", "facts_of"]

#: bncore's normalization kinds that keep running statistics (the others: none, group, layer).
BATCH_KINDS = ("batch", "ghost", "renorm", "noisy")


@dataclass
class LayerFacts:
    """One BN layer: its configuration (torch's momentum convention; None: unknown, except
    ``momentum``, where None means the cumulative average and ``momentum_known`` says whether
    it is known at all) and what surrounds it."""

    name: str
    cls: str | None = None
    momentum: float | None = None
    momentum_known: bool = False
    eps: float | None = None
    affine: bool | None = None
    track_running_stats: bool | None = None
    dtype: str | None = None
    activation: str | None = None  # the activation that takes its output (SATURATION's names)
    zero_init_gamma: bool = False  # gamma zero at initialization, on purpose (Goyal et al.)
    bias_before: bool | None = None  # the layer feeding it has a bias
    dropout_before: float | None = None  # p of a Dropout between its weighted layer and it
    norm_weight_decay: float | None = None  # weight decay on its gamma and beta


@dataclass
class RunFacts:
    """A run's facts; ``source``: 'engine' (bncore's own networks) or 'client' (a user's)."""

    source: str
    layers: dict[str, LayerFacts] = field(default_factory=dict)
    bn_modules: list[str] | None = None  # every BN module of the model, recorded or not
    output_layer: str | None = None  # a BN whose output reaches the model's output directly
    world: int = 1  # data-parallel replicas
    sync_bn: bool | None = None
    batch: int | None = None  # examples per normalization batch, where the config fixes it
    weight_decay: float | None = None  # on the weights that feed BN
    steps_total: int | None = None
    has_batch_norm: bool = True  # False for an engine run without BN (none, group, layer)
    structure_known: bool = False

    def layer(self, name: str) -> LayerFacts:
        """The facts of ``name`` (rank k's ``rank{k}.<layer>`` is its layer's), made empty on
        first ask."""
        base = name.split(".", 1)[1] if name.startswith("rank") and "." in name else name
        found = self.layers.get(base)
        if found is None:
            found = self.layers[base] = LayerFacts(base)
        return found


def facts_of(meta: Mapping[str, Any] | None) -> RunFacts:
    """The facts a run's meta gives (an empty meta: nothing is known)."""
    meta = meta or {}
    if isinstance(meta.get("config"), Mapping):
        return _engine(meta)
    return _client(meta)


def _engine(meta: Mapping[str, Any]) -> RunFacts:
    cfg = meta["config"]
    norm, model = cfg.get("norm") or {}, cfg.get("model") or {}
    optim, dist = cfg.get("optim") or {}, cfg.get("distributed") or {}
    kind = norm.get("kind", "batch")
    world = int(dist.get("replicas") or 1)
    sync = bool(dist.get("sync_bn")) if world > 1 else None
    batch = int(cfg.get("batch_size") or 0) or None
    if batch is not None and world > 1 and not sync:
        batch //= world  # each replica normalizes its own share
    if kind == "ghost" and batch is not None:
        batch = min(batch, int(norm.get("virtual_batch") or batch))
    momentum, eps = _engine_momentum(norm)
    wd = float(optim.get("weight_decay") or 0.0)
    facts = RunFacts(
        "engine",
        world=world,
        sync_bn=sync,
        batch=batch,
        weight_decay=wd,
        steps_total=cfg.get("steps"),
        has_batch_norm=kind in BATCH_KINDS,
        structure_known=True,
    )
    bias = bool(model.get("bias", False))
    for name in meta.get("layers") or []:
        facts.layers[name] = LayerFacts(
            name,
            cls={"batch": "BatchNorm"}.get(kind, kind),
            momentum=momentum,
            momentum_known=kind in BATCH_KINDS,
            eps=eps,
            # per layer, as its records show: a block may have no norm (a pre-activation stem)
            affine=None,
            track_running_stats=None if kind in BATCH_KINDS else False,
            activation=model.get("activation", "relu"),
            zero_init_gamma=bool(model.get("zero_init_residual")) and name.endswith(".b"),
            bias_before=bias,
            norm_weight_decay=wd if optim.get("norm_weight_decay", True) else 0.0,
        )
    facts.bn_modules = list(facts.layers) if kind in BATCH_KINDS else []
    return facts


def _engine_momentum(norm: Mapping[str, Any]) -> tuple[float | None, float]:
    """(torch-convention momentum or None for the cumulative average, eps) of a NormConfig."""
    return NormConfig.model_validate(dict(norm)).resolved()


def _client(meta: Mapping[str, Any]) -> RunFacts:
    structure = meta.get("structure") or {}
    optimizer = meta.get("optimizer") or {}
    dist = meta.get("distributed") or {}
    world = int(dist.get("world") or 1)
    facts = RunFacts(
        "client",
        bn_modules=list(meta["bn_modules"]) if "bn_modules" in meta else None,
        output_layer=structure.get("output_layer"),
        world=world,
        sync_bn=dist.get("sync_bn") if world > 1 else None,
        weight_decay=optimizer.get("weight_decay"),
        steps_total=meta.get("steps_total"),
        structure_known=bool(structure),
    )
    for name in meta.get("layers") or []:
        facts.layer(name)
    for name, cfg in (meta.get("layer_config") or {}).items():
        layer = facts.layer(name)
        layer.cls = cfg.get("class")
        layer.momentum_known = "momentum" in cfg
        layer.momentum = cfg.get("momentum")
        layer.eps, layer.affine = cfg.get("eps"), cfg.get("affine")
        layer.track_running_stats, layer.dtype = cfg.get("track_running_stats"), cfg.get("dtype")
    for name, kind in (structure.get("activation") or {}).items():
        facts.layer(name).activation = kind
    for name in structure.get("zero_init_gamma") or []:
        facts.layer(name).zero_init_gamma = True
    for name in structure.get("bias_before") or []:
        facts.layer(name).bias_before = True
    for name, p in (structure.get("dropout_before") or {}).items():
        facts.layer(name).dropout_before = float(p)
    for name, wd in (optimizer.get("norm_weight_decay") or {}).items():
        facts.layer(name).norm_weight_decay = float(wd)
    if structure:
        for layer in facts.layers.values():
            layer.bias_before = bool(layer.bias_before)
    return facts

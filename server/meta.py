"""The keys of a run's meta that BN Scope reads, and the shape each must have: written by
bncore's engine (a server's worker) and watcher (a script), read by the run view, the report, the
BN doctor and the API's layer listings. Any other key is kept and shown as it came.

At ingest (a script's run created, a status with meta) a key of the wrong shape is a 422 naming
it (:func:`check_meta`); on reading, a stored meta is never trusted: a key of the wrong shape,
kept from before this check, reads as absent (:func:`readable_meta`). What a view costs is
bounded by the records stored, not by numbers in the meta (``replicas``, ``tracked_units``):
those only name what to look for among the series that are there.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bncore.run.config import FieldsError

#: Processes of one run (a meta's ``replicas``, ``distributed.world``).
MAX_REPLICAS = 1024
#: Layers a meta may list (a model's BN layers, times its replicas).
MAX_META_LAYERS = 65_536
#: A layer's name, as the records' (server.store.schema.MAX_LAYER_NAME).
LayerName = Annotated[str, Field(min_length=1, max_length=512)]
Count = Annotated[int, Field(ge=0, le=2**31)]


class _Shape(BaseModel):
    """JSON as it came (strict: "3" is no number), other keys allowed."""

    model_config = ConfigDict(extra="allow", strict=True)


class _Distributed(_Shape):
    world: int = Field(1, ge=1, le=MAX_REPLICAS)
    sync_bn: bool | None = None


class _Structure(_Shape):
    output_layer: str | None = None
    zero_init_gamma: list[str] = []
    bias_before: list[str] = []
    activation: dict[str, str | None] = {}
    dropout_before: dict[str, Any] = {}


class _Optimizer(_Shape):
    weight_decay: float | None = None


class RunMeta(_Shape):
    """The keys read of a run's meta (bncore.run.engine's ``Trainer.meta``,
    bncore.record.watcher's ``Watcher.meta``)."""

    layers: list[LayerName] | None = Field(None, max_length=MAX_META_LAYERS)
    channels: list[Count] | None = Field(None, max_length=MAX_META_LAYERS)
    tracked_units: list[list[Count]] | None = Field(None, max_length=MAX_META_LAYERS)
    layer_kinds: list[str] | None = Field(None, max_length=MAX_META_LAYERS)
    replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)
    steps_total: int | None = Field(None, ge=1, le=2**62)
    not_recorded: dict[str, str] | None = None
    layer_config: dict[str, dict[str, Any]] | None = None
    bn_modules: list[str] | None = None
    structure: _Structure | None = None
    optimizer: _Optimizer | None = None
    distributed: _Distributed | None = None
    config: dict[str, Any] | None = None


def check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as given, if each key BN Scope reads has its shape; FieldsError naming the first
    that has not (``replicas``, ``structure.activation``: a 422 for ``meta.replicas``...)."""
    try:
        RunMeta.model_validate(meta)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"])
        given = repr(first.get("input"))
        more = f" (and {len(errors) - 1} more errors in meta)" if len(errors) > 1 else ""
        raise FieldsError(
            f"{first['msg']}, not {given[:80]}: BN Scope reads this key of a run's meta{more}",
            where,
        ) from None
    return meta


def readable_meta(meta: Any) -> dict[str, Any]:
    """A stored meta as it may be read: its keys of the wrong shape (stored before they were
    checked) left out; {} for one that is not an object."""
    if not isinstance(meta, dict):
        return {}
    try:
        RunMeta.model_validate(meta)
    except ValidationError as exc:
        bad = {e["loc"][0] for e in exc.errors(include_url=False) if e["loc"]}
        return {k: v for k, v in meta.items() if k not in bad}
    return meta

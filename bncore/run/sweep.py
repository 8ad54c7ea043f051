"""A sweep: one run per point of a grid over config fields. Its points, and each point's config,
are made here and only here, for the server's sweeps, the experiments and ``bnscope experiment``."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from bncore.run.config import set_field

__all__ = ["grid_points", "point_config"]


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, each as {dotted field: value}, the first field
    varying slowest (an empty grid: one point, the base itself)."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def point_config(base: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    """The config data of one point: a copy of ``base`` with the point's dotted fields set
    (:func:`~bncore.run.config.set_field`: a FieldPathError names a field that cannot be)."""
    config = copy.deepcopy(dict(base))
    for dotted, value in point.items():
        set_field(config, dotted, value)
    return config

"""bncore: BN Scope's PyTorch core.

- our own batch normalization, exact to torch.nn's semantics, that records what it computes
  (:mod:`bncore.nn.batchnorm`, :mod:`bncore.nn.functional`, :mod:`bncore.nn.byproducts`),
  on the kernels of :mod:`bncore.nn.kernels`;
- what a run is (:mod:`bncore.run.config`), its data (:mod:`bncore.run.data`) and network
  (:mod:`bncore.run.models`);
- the training loop that records every layer at every step (:mod:`bncore.run.engine`,
  :mod:`bncore.record.recorder`) in the columns of :mod:`bncore.record.tables`.

    import bncore
    result = bncore.train(bncore.RunConfig(steps=300))
    result.records.layers["pre_var"]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bncore.nn import functional
from bncore.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, keras_momentum_to_torch
from bncore.nn.byproducts import BNStats
from bncore.version import __version__

if TYPE_CHECKING:
    from bncore.run.config import RunConfig
    from bncore.run.engine import RunResult, Trainer, train

#: Imported on first use: a script that only watches its own model (bnscope.client) does not
#: pay for the training loop, its datasets and models.
_LAZY = {
    "RunConfig": "bncore.run.config",
    "RunResult": "bncore.run.engine",
    "Trainer": "bncore.run.engine",
    "train": "bncore.run.engine",
}

__all__ = [
    "BNStats",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "RunConfig",
    "RunResult",
    "Trainer",
    "__version__",
    "functional",
    "keras_momentum_to_torch",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bncore' has no attribute {name!r}")

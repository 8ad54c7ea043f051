"""bncore: BN Scope's PyTorch core.

- our own batch normalization, exact to torch.nn's semantics, that records what it computes
  (:mod:`bncore.batchnorm`, :mod:`bncore.functional`, :mod:`bncore.stats`), on the kernels of
  :mod:`bncore.kernels`;
- what a run is (:mod:`bncore.config`), its data (:mod:`bncore.data`) and network
  (:mod:`bncore.models`);
- the training loop that records every layer at every step (:mod:`bncore.engine`,
  :mod:`bncore.probes`) in the columns of :mod:`bncore.records`.

    import bncore
    result = bncore.train(bncore.RunConfig(steps=300))
    result.records.layers["pre_var"]
"""

from bncore import functional
from bncore.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, keras_momentum_to_torch
from bncore.config import RunConfig
from bncore.engine import RunResult, Trainer, train
from bncore.stats import BNStats

__all__ = [
    "BNStats",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "RunConfig",
    "RunResult",
    "Trainer",
    "functional",
    "keras_momentum_to_torch",
    "train",
]
__version__ = "0.1.0"

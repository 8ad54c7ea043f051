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

from bncore.nn import functional
from bncore.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, keras_momentum_to_torch
from bncore.nn.byproducts import BNStats
from bncore.run.config import RunConfig
from bncore.run.engine import RunResult, Trainer, train

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

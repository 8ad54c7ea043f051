"""bncore: BN Scope's PyTorch core.

Our own batch normalization, exact to torch.nn's semantics, that records what it computes
(:mod:`bncore.batchnorm`, :mod:`bncore.functional`, :mod:`bncore.stats`), and the kernels it runs
on (:mod:`bncore.kernels`).
"""

from bncore import functional
from bncore.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, keras_momentum_to_torch
from bncore.stats import BNStats

__all__ = [
    "BNStats",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "functional",
    "keras_momentum_to_torch",
]
__version__ = "0.1.0"

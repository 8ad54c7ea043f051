"""Every rule of the BN doctor, in the order a run's findings are checked (train-eval-gap last:
it names the others that explain it). docs/diagnoses.md is written from these classes."""

from __future__ import annotations

from bncore.diagnose.rules.base import Rule
from bncore.diagnose.rules.batches import (
    BatchOfOne,
    GradAccumulationMicroBatch,
    NonIIDBatches,
    SmallBatch,
)
from bncore.diagnose.rules.channels import ConstantChannel, DeadChannels, WeightDecayOnNorm
from bncore.diagnose.rules.modes import BNEvalDuringTraining, TrainEvalGap, ValidationInTrainMode
from bncore.diagnose.rules.optimization import BiasBeforeBN, EffectiveLRDecay
from bncore.diagnose.rules.running import (
    FrozenButUpdating,
    NonfiniteRunningStats,
    RankBuffersDiverge,
    RunningStatsNotUpdating,
    StaleRunningStats,
)
from bncore.diagnose.rules.setup import (
    BNBeforeOutput,
    CumulativeMomentumInTraining,
    DDPWithoutSyncBN,
    DropoutBeforeBN,
    MomentumConvention,
)

__all__ = ["RULES", "Rule"]

RULES: tuple[type[Rule], ...] = (
    NonfiniteRunningStats,
    BatchOfOne,
    MomentumConvention,
    CumulativeMomentumInTraining,
    RunningStatsNotUpdating,
    FrozenButUpdating,
    ValidationInTrainMode,
    BNEvalDuringTraining,
    SmallBatch,
    GradAccumulationMicroBatch,
    DDPWithoutSyncBN,
    RankBuffersDiverge,
    StaleRunningStats,
    NonIIDBatches,
    DropoutBeforeBN,
    DeadChannels,
    ConstantChannel,
    WeightDecayOnNorm,
    EffectiveLRDecay,
    BiasBeforeBN,
    BNBeforeOutput,
    TrainEvalGap,
)

"""Experiments: the BN literature's findings, each one sweep of runs away.

:mod:`bncore.experiments.framework` says what an experiment is and reads its result from its
runs; :mod:`bncore.experiments.catalog` holds the experiments; :mod:`bncore.experiments.verdicts`
says whether each one's runs agree with its paper.
"""

from bncore.experiments.catalog import EXPERIMENTS
from bncore.experiments.framework import (
    Experiment,
    Missing,
    Panel,
    Point,
    Verdict,
    needs,
    reduce_point,
    result,
)

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "Missing",
    "Panel",
    "Point",
    "Verdict",
    "needs",
    "reduce_point",
    "result",
]

"""Experiments: the BN literature's findings, each one sweep of runs away.

:mod:`bncore.science.experiments.framework` says what an experiment is and reads its result from its
runs; :mod:`bncore.science.experiments.catalog` holds the experiments;
:mod:`bncore.science.experiments.verdicts` says whether each one's runs agree with its paper.
"""

from bncore.science.experiments.catalog import EXPERIMENTS
from bncore.science.experiments.framework import (
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

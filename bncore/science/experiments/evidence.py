"""The statistics the verdicts share, written once: an effect against its noise margin, and the
shape of a growth over depth.

A verdict agrees only where the measurement could have disagreed: an effect counts when it is
larger than its margin (a stated floor, or ``k`` standard errors of its spread over seeds or
evaluations, whichever is larger) and points the claimed way in every sample; a growth is called
linear or exponential only where two tests of the shape (fits of the values, the trend of the
increments) say the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["GrowthShape", "SampledEffect", "growth_shape"]


@dataclass(frozen=True)
class SampledEffect:
    """An effect measured once per sample (a seed, or an evaluation), signed so that a positive
    value is the claimed direction, and the test the claim puts to it.

    A claimed effect (``within`` false) holds when its mean is larger than :attr:`margin`
    (``floor``, or ``k`` standard errors of the samples, whichever is larger) and every sample is
    positive: one seed in three going the other way is no agreement. A claimed absence of effect
    ("trains about as well", ``within`` true) holds when the effect, its noise included, stays
    within the tolerance ``floor``: ``|mean| + k`` standard errors under it, and every sample
    within it. A single sample has no spread: its margin is the floor (or, for an absence, no
    allowance for noise).
    """

    samples: tuple[float, ...]
    floor: float  # the smallest effect that counts; with ``within``, the tolerance
    over: str = "seeds"  # what a sample is, for the sentence
    k: float = 2.0
    within: bool = False

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """The samples' standard deviation (0 for one sample)."""
        return float(np.std(self.samples, ddof=1)) if len(self.samples) > 1 else 0.0

    @property
    def noise(self) -> float:
        """``k`` standard errors of the mean."""
        return self.k * self.spread / math.sqrt(max(len(self.samples), 1))

    @property
    def margin(self) -> float:
        """What the mean must exceed (a claimed effect), or what is added to its size before it
        is held against the tolerance (a claimed absence)."""
        return self.noise if self.within else max(self.floor, self.noise)

    @property
    def agreeing(self) -> int:
        """How many samples point the claimed way (an absence: lie within the tolerance)."""
        if self.within:
            return sum(abs(s) < self.floor for s in self.samples)
        return sum(s > 0 for s in self.samples)

    @property
    def holds(self) -> bool:
        n = len(self.samples)
        if not n or self.agreeing < n:
            return False
        if self.within:
            return abs(self.mean) + self.margin < self.floor
        return self.mean > self.margin

    def measured(self, fmt: Callable[[float], str]) -> str:
        """The mean and its spread over the samples, each number written by ``fmt``."""
        n = len(self.samples)
        if n == 1:
            return f"{fmt(self.mean)} (1 {self.over[:-1]})"
        return f"{fmt(self.mean)} (mean of {n} {self.over}, spread {_size(fmt, self.spread)})"

    def test(self, fmt: Callable[[float], str]) -> str:
        """The test, with its margin, in words."""
        every = f"every {self.over[:-1]}"
        if self.within:
            return (
                f"within {_size(fmt, self.floor)} either way, with {self.k:g} standard errors "
                f"({_size(fmt, self.noise)}) added to its size, on {every}"
            )
        return (
            f"larger than {_size(fmt, self.margin)} (the larger of {_size(fmt, self.floor)} and "
            f"{self.k:g} standard errors), the claimed way on {every}"
        )

    def describe(self, fmt: Callable[[float], str]) -> str:
        """The effect, its spread and margin, and on how many samples it agrees, each number
        written by ``fmt`` (for example ``lambda v: f"{100 * v:+.1f} points"``)."""
        n = len(self.samples)
        way = "within it" if self.within else "the claimed way"
        if n == 1:
            return f"{self.measured(fmt)[:-1]}; {self._limit(fmt)})"
        return f"{self.measured(fmt)[:-1]}; {self._limit(fmt)}; {way} on {self.agreeing} of {n})"

    def _limit(self, fmt: Callable[[float], str]) -> str:
        if self.within:
            return (
                f"tolerance {_size(fmt, self.floor)}, against its size with {self.k:g} standard "
                f"errors {_size(fmt, abs(self.mean) + self.margin)}"
            )
        if len(self.samples) == 1:
            return f"margin {_size(fmt, self.margin)}"
        return (
            f"margin {_size(fmt, self.margin)}, the larger of {_size(fmt, self.floor)} and "
            f"{self.k:g} standard errors"
        )


def _size(fmt: Callable[[float], str], v: float) -> str:
    """A spread, a margin or a tolerance: written without a sign."""
    return fmt(v).lstrip("+")


@dataclass(frozen=True)
class GrowthShape:
    """How a positive series grows over depth.

    ``ratio``: the geometric mean factor per step; ``increment_ratio``: the factor by which the
    increments grow per step (a least-squares line through their logarithms; NaN where an
    increment is not positive); ``linear_misfit`` and ``exponential_misfit``: the RMS relative
    residuals of a straight line through the values and through their logarithms. ``kind``:
    "flat" (under ``flat`` growth per step), "linear" or "exponential" where the fits and the
    increments agree, "unclear" where they do not.
    """

    kind: Literal["flat", "linear", "exponential", "unclear"]
    ratio: float
    increment_ratio: float
    linear_misfit: float
    exponential_misfit: float


def growth_shape(values: Sequence[float] | np.ndarray, flat: float = 0.01) -> GrowthShape:
    """Linear or exponential growth of ``values`` (at least 3, positive).

    Linear growth adds the same each step: its increments stay constant (their ratio is 1) and a
    straight line fits the values better than an exponential. Exponential growth multiplies:
    its increments grow by the same factor as the values, and a straight line through the
    logarithms fits better. A linear growth from a small start has a large ratio per step but
    constant increments; an exponential one at x1.25 a small ratio but increments growing x1.25.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 3 or not (v > 0).all():
        raise ValueError(f"need at least 3 positive values, got {v.tolist()}")
    x = np.arange(v.size, dtype=np.float64)
    ratio = float((v[-1] / v[0]) ** (1 / (v.size - 1)))
    lin = np.polyval(np.polyfit(x, v, 1), x)
    linear_misfit = float(np.sqrt(np.mean(((v - lin) / v) ** 2)))
    log_fit = np.polyval(np.polyfit(x, np.log(v), 1), x)
    exponential_misfit = float(np.sqrt(np.mean((np.log(v) - log_fit) ** 2)))
    steps = np.diff(v)
    increment_ratio = float("nan")
    if (steps > 0).all():
        increment_ratio = float(math.exp(np.polyfit(x[:-1], np.log(steps), 1)[0]))
    if abs(ratio - 1) < flat and np.abs(steps).max() < flat * v.mean():
        kind: Literal["flat", "linear", "exponential", "unclear"] = "flat"
    else:
        # the increments' trend: nearer no growth (linear) or the values' own factor (exponential)
        by_increments = None
        if math.isfinite(increment_ratio) and ratio > 1:
            midway = 0.5 * math.log(ratio)  # between log(1) (linear) and log(ratio)
            by_increments = "exponential" if math.log(increment_ratio) > midway else "linear"
        by_fit = "exponential" if exponential_misfit < linear_misfit else "linear"
        kind = by_fit if by_increments in (None, by_fit) else "unclear"  # type: ignore[assignment]
    return GrowthShape(kind, ratio, increment_ratio, linear_misfit, exponential_misfit)

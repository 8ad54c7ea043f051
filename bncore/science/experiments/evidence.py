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
    value is the claimed direction.

    It holds when its mean is larger than :attr:`margin` (``floor``, or ``k`` standard errors
    of the samples, whichever is larger) and every sample is positive: one seed in three going
    the other way is no agreement. A single sample has no spread: its margin is the floor.
    """

    samples: tuple[float, ...]
    floor: float
    over: str = "seeds"  # what a sample is, for the sentence
    k: float = 2.0

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """The samples' standard deviation (0 for one sample)."""
        return float(np.std(self.samples, ddof=1)) if len(self.samples) > 1 else 0.0

    @property
    def margin(self) -> float:
        return max(self.floor, self.k * self.spread / math.sqrt(max(len(self.samples), 1)))

    @property
    def positive(self) -> int:
        """How many samples point the claimed way."""
        return sum(s > 0 for s in self.samples)

    @property
    def holds(self) -> bool:
        n = len(self.samples)
        return n > 0 and self.mean > self.margin and self.positive == n

    def describe(self, fmt: Callable[[float], str]) -> str:
        """The effect, its spread and margin, and on how many samples it points the claimed way,
        each number written by ``fmt`` (for example ``lambda v: f"{100 * v:+.1f} points"``)."""
        n = len(self.samples)

        def size(v: float) -> str:  # a spread or a margin: no sign
            return fmt(v).lstrip("+")

        if n == 1:
            return f"{fmt(self.mean)} (1 {self.over[:-1]}; margin {size(self.margin)})"
        return (
            f"{fmt(self.mean)} (mean of {n} {self.over}, spread {size(self.spread)}; margin "
            f"{size(self.margin)}, the larger of {size(self.floor)} and {self.k:g} standard "
            f"errors; the claimed way on {self.positive} of {n})"
        )


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

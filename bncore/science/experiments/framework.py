"""What an experiment is, and how its result is read from its runs.

An :class:`Experiment` is a sweep (a base RunConfig and a grid of fields to vary), the sentence
saying what the literature found, the panels that put the measurement (and the theory, where
there is a closed form) side by side, and the check that says whether this measurement agrees
with the paper (:class:`Verdict`). :func:`result` turns the recorded series of the sweep's runs
into those panels and that verdict, as plain numbers and words: drawing them is the dashboard's
job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bncore.downsample import measured
from bncore.run.sweep import grid_points, point_config
from bncore.science.theory import gradient_growth_rate

__all__ = [
    "Experiment",
    "Missing",
    "Panel",
    "Point",
    "Provoked",
    "Verdict",
    "doctor_agrees",
    "needs",
    "reduce_point",
    "result",
]

#: Points per line of an over-steps panel.
MAX_PANEL_POINTS = 400


@dataclass(frozen=True)
class Panel:
    """One figure of an experiment's result.

    ``over_steps``: each run's ``stats`` (at ``layer``; "" for step/eval statistics, "last" for
    the last block) over training steps. ``by_value``: one number per run (``reduce`` of its
    first stat: ``final``, ``best``, ``mean``, ``steps_to`` reaching ``target``, or ``growth``, the
    measured per-layer gradient growth) against the grid field ``x``; ``theory`` gives the
    closed form for a run's config, drawn dashed beside it. ``by_layer``: each run's ``stats``
    at its first evaluation, through the layers that have them (input side first).
    """

    title: str
    kind: Literal["over_steps", "by_value", "by_layer"]
    stats: tuple[str, ...]
    y_label: str
    layer: str = ""
    x: str | None = None
    log_x: bool = False
    reduce: Literal["final", "best", "mean", "steps_to", "growth"] = "final"
    target: float | None = None
    theory: Callable[[dict[str, Any]], float] | None = None
    theory_label: str = ""
    log_y: bool = False


@dataclass(frozen=True)
class Verdict:
    """Whether this measurement agrees with the paper, and what it measured, in one sentence
    with its numbers (where it disagrees, the sentence says where); ``measured`` and ``test``
    say the same in short, for a table: the numbers with their spread over seeds, and the test
    they were put to with its margin."""

    agrees: bool
    text: str
    measured: str = ""
    test: str = ""


class Missing(LookupError):
    """A verdict's check needs a run or a measurement that is not (yet) there."""


@dataclass(frozen=True)
class Provoked:
    """A BN pitfall an experiment provokes on purpose: the BN doctor must diagnose ``rule``
    in the runs at the grid values ``where``, and not in the runs at ``control``."""

    rule: str
    where: dict[str, Any]
    control: dict[str, Any]


@dataclass(frozen=True)
class Experiment:
    key: str
    title: str
    claim: str  # what the literature found, in one sentence, with the reference
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    panels: tuple[Panel, ...]
    full: dict[str, Any] = field(default_factory=dict)  # dotted overrides for a GPU
    note: str = ""  # how this reproduction differs from the paper's setting
    # settings that follow a point's grid values (dotted -> value), e.g. steps for fixed epochs
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # whether the runs agree with the claim (raises Missing while the runs are not all there)
    verdict: Callable[[Sequence[Point]], Verdict] | None = None
    # the pitfalls its arms provoke on purpose, for the BN doctor to find (bncore.diagnose)
    provokes: tuple[Provoked, ...] = ()
    # the grid's points to run (None: every one), where the product has arms the claim needs not
    keep: Callable[[dict[str, Any]], bool] | None = None

    def sweep(
        self, size: Literal["quick", "full"] = "quick", overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The sweep to run at ``size`` ({"base", "grid"}, or {"base", "points"} where settings
        are derived per point), with dotted ``overrides`` of the base
        (``{"data.name": "mnist", "data.path": "/data/mnist"}``)."""
        given = {**(self.full if size == "full" else {}), **(overrides or {})}
        base = point_config(self.base, given)  # the dotted overrides set as a point's values
        grid = {k: list(v) for k, v in self.grid.items()}
        if self.derive is None and self.keep is None:
            return {"base": base, "grid": grid}
        derive = self.derive or (lambda p: {})
        return {"base": base, "points": [{**p, **derive(p)} for p in self._points()]}

    def _points(self) -> list[dict[str, Any]]:
        return [p for p in grid_points(self.grid) if self.keep is None or self.keep(p)]

    def runs(self) -> int:
        """Runs in the sweep."""
        if self.keep is None:
            return math.prod(len(v) for v in self.grid.values())
        return len(self._points())


@dataclass
class Point:
    """One finished (or running) run of a sweep: its config, the grid values it was run at, and
    its series {(layer, stat): (steps, values)}."""

    config: dict[str, Any]
    values: dict[str, Any]
    series: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    layers: list[str]
    #: the BN doctor's diagnoses of the run, (rule, severity) each; None: not diagnosed
    diagnoses: list[tuple[str, str]] | None = None


def needs(exp: Experiment, layers: Sequence[str]) -> list[tuple[str, str]]:
    """The (layer, stat) series :func:`result` reads of a run with these blocks."""
    keys: list[tuple[str, str]] = []
    for p in exp.panels:
        if p.reduce == "growth" or p.kind == "by_layer":
            keys += [(layer, s) for layer in layers for s in p.stats]
        else:
            layer = (layers[-1] if layers else "") if p.layer == "last" else p.layer
            keys += [(layer, s) for s in p.stats]
    return list(dict.fromkeys(keys))


def _label(values: dict[str, Any], skip: str | None = None) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in values.items() if k != skip]
    return ", ".join(parts) or "run"


def reduce_point(p: Panel, point: Point) -> float | None:
    """A by_value panel's number for one run (None: not measured)."""
    if p.reduce == "growth":
        cols = [point.series.get((layer, p.stats[0])) for layer in point.layers]
        if not point.layers or any(c is None or not len(c[1]) for c in cols):
            return None
        n = min(len(c[1]) for c in cols if c is not None)
        stacked = np.stack([c[1][:n] for c in cols if c is not None], axis=1)  # steps x layers
        return gradient_growth_rate({p.stats[0]: stacked.reshape(-1)}, len(point.layers))
    layer = (point.layers[-1] if point.layers else "") if p.layer == "last" else p.layer
    steps, vals = point.series.get((layer, p.stats[0]), (np.empty(0), np.empty(0)))
    ok = np.isfinite(vals)
    if not ok.any():
        return None
    if p.reduce == "final":
        return float(vals[ok][-1])
    if p.reduce == "best":
        return float(vals[ok].max())
    if p.reduce == "mean":
        return float(vals[ok].mean())
    hit = np.nonzero(vals >= (p.target or 0.0))[0]  # steps_to
    return float(steps[hit[0]]) if len(hit) else None


def _thin(steps: np.ndarray, vals: np.ndarray) -> tuple[list, list]:
    """At most MAX_PANEL_POINTS of the measured points (steps without a measurement, NaN, dropped),
    each bucket's extremes kept (bncore.downsample)."""
    steps, vals = measured(steps, vals, MAX_PANEL_POINTS)
    return steps.tolist(), [float(v) for v in vals]


def _first_values(point: Point, stat: str) -> tuple[list[str], list[float]]:
    """``stat`` at the run's first evaluation, through its layers that have it."""
    xs, ys = [], []
    for layer in point.layers:
        _, vals = point.series.get((layer, stat), (np.empty(0), np.empty(0)))
        ok = np.isfinite(vals)
        if ok.any():
            xs.append(layer)
            ys.append(float(vals[ok][0]))
    return xs, ys


def result(exp: Experiment, points: Sequence[Point]) -> dict[str, Any]:
    """The experiment's panels from its runs: {"title", "claim", "note", "verdict", "panels":
    [{"title", "kind", "x_label", "y_label", "log_x", "log_y", "series": [{"name", "x", "y",
    "theory"}]}]}; "verdict" is {"agrees", "text", "measured", "test"}, or None while runs are
    missing."""
    panels = []
    for p in exp.panels:
        series: list[dict[str, Any]] = []
        if p.kind == "by_layer":
            for point in points:
                for stat in p.stats:
                    x, y = _first_values(point, stat)
                    name = _label(point.values) + (f" {stat}" if len(p.stats) > 1 else "")
                    series.append({"name": name, "x": x, "y": y, "theory": False})
        elif p.kind == "over_steps":
            for point in points:
                layer = (point.layers[-1] if point.layers else "") if p.layer == "last" else p.layer
                for stat in p.stats:
                    steps, vals = point.series.get((layer, stat), (np.empty(0), np.empty(0)))
                    x, y = _thin(steps, vals) if len(steps) else ([], [])
                    name = _label(point.values) + (f" {stat}" if len(p.stats) > 1 else "")
                    series.append({"name": name, "x": x, "y": y, "theory": False})
        else:
            x_key = p.x
            assert x_key is not None
            groups: dict[str, list[Point]] = {}
            for point in points:
                groups.setdefault(_label(point.values, skip=x_key), []).append(point)
            for name, members in groups.items():
                members = sorted(members, key=lambda m: m.values[x_key])
                xs = [m.values[x_key] for m in members]
                series.append(
                    {
                        "name": name,
                        "x": xs,
                        "y": [reduce_point(p, m) for m in members],
                        "theory": False,
                    }
                )
                if p.theory is not None:
                    series.append(
                        {
                            "name": f"{name}: {p.theory_label or 'theory'}",
                            "x": xs,
                            "y": [p.theory(m.config) for m in members],
                            "theory": True,
                        }
                    )
        panels.append(
            {
                "title": p.title,
                "kind": p.kind,
                "x_label": {"over_steps": "step", "by_layer": "layer"}.get(p.kind, p.x or ""),
                "y_label": p.y_label,
                "log_x": p.log_x,
                "log_y": p.log_y,
                "series": series,
            }
        )
    verdict = None
    if exp.verdict is not None:
        try:
            found = exp.verdict(points)
            verdict = {"agrees": bool(found.agrees), "text": found.text,
                       "measured": found.measured, "test": found.test}  # fmt: skip
        except Missing:
            pass
    return {"title": exp.title, "claim": exp.claim, "note": exp.note, "verdict": verdict,
            "panels": panels, **doctor_agrees(exp, points)}  # fmt: skip


def doctor_agrees(exp: Experiment, points: Sequence[Point]) -> dict[str, Any]:
    """Each run's diagnoses ({"run": label, "diagnoses": [{"rule", "severity"}]}), and for
    each pitfall the experiment provokes whether the doctor found it there and not in the
    control ({"rule", "where", "control", "found": bool | None, "control_clear": bool |
    None}; None while those runs are missing or undiagnosed)."""
    runs = [
        {"run": _label(p.values), "diagnoses": [{"rule": r, "severity": s} for r, s in p.diagnoses]}
        for p in points
        if p.diagnoses is not None
    ]
    provoked = []
    for pro in exp.provokes:
        arm = [p for p in points if _at(p, pro.where) and p.diagnoses is not None]
        ctl = [p for p in points if _at(p, pro.control) and p.diagnoses is not None]
        provoked.append({
            "rule": pro.rule, "where": _label(pro.where), "control": _label(pro.control),
            "found": all(_has(p, pro.rule) for p in arm) if arm else None,
            "control_clear": not any(_has(p, pro.rule) for p in ctl) if ctl else None,
        })  # fmt: skip
    return {"diagnoses": runs, "provoked": provoked}


def _at(point: Point, where: dict[str, Any]) -> bool:
    return all(point.values.get(k) == v for k, v in where.items())


def _has(point: Point, rule: str) -> bool:
    return any(r == rule for r, _ in point.diagnoses or [])

"""Experiments: the BN literature's findings, each one sweep of runs away.

An :class:`Experiment` is a sweep (a base RunConfig and a grid of fields to vary), the sentence
saying what the literature found, and the panels that put the measurement (and the theory, where
there is a closed form) side by side. :func:`result` turns the recorded series of the sweep's
runs into those panels, as plain numbers: drawing them is the dashboard's job.

Default sizes finish in minutes on a 2-core CPU; ``full`` holds the overrides for a GPU.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Literal

import numpy as np

from bncore.config import DataConfig, DatasetName, get_field, set_field
from bncore.data import load_dataset
from bncore.downsample import measured
from bncore.theory import gradient_explosion_rate, gradient_growth_rate

__all__ = ["EXPERIMENTS", "Experiment", "Panel", "Point", "needs", "result"]

#: Points per line of an over-steps panel.
MAX_POINTS = 400


@dataclass(frozen=True)
class Panel:
    """One figure of an experiment's result.

    ``over_steps``: each run's ``stats`` (at ``layer``; "" for step/eval statistics, "last" for
    the last block) over training steps. ``by_value``: one number per run (``reduce`` of its
    first stat: ``final``, ``best``, ``steps_to`` reaching ``target``, or ``growth``, the
    measured per-layer gradient growth) against the grid field ``x``; ``theory`` gives the
    closed form for a run's config, drawn dashed beside it.
    """

    title: str
    kind: Literal["over_steps", "by_value"]
    stats: tuple[str, ...]
    y_label: str
    layer: str = ""
    x: str | None = None
    log_x: bool = False
    reduce: Literal["final", "best", "steps_to", "growth"] = "final"
    target: float | None = None
    theory: Callable[[dict[str, Any]], float] | None = None
    theory_label: str = ""


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

    def sweep(
        self, size: Literal["quick", "full"] = "quick", overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The sweep to run at ``size`` ({"base", "grid"}, or {"base", "points"} where settings
        are derived per point), with dotted ``overrides`` of the base
        (``{"data.name": "mnist", "data.path": "/data/mnist"}``)."""
        base = copy.deepcopy(self.base)
        for dotted, value in {**(self.full if size == "full" else {}), **(overrides or {})}.items():
            set_field(base, dotted, value)
        grid = {k: list(v) for k, v in self.grid.items()}
        if self.derive is None:
            return {"base": base, "grid": grid}
        points = [dict(zip(grid, values, strict=True)) for values in product(*grid.values())]
        return {"base": base, "points": [{**p, **self.derive(p)} for p in points]}

    def runs(self) -> int:
        """Runs in the sweep."""
        return math.prod(len(v) for v in self.grid.values())


@dataclass
class Point:
    """One finished (or running) run of a sweep: its config, the grid values it was run at, and
    its series {(layer, stat): (steps, values)}."""

    config: dict[str, Any]
    values: dict[str, Any]
    series: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    layers: list[str]


def needs(exp: Experiment, layers: Sequence[str]) -> list[tuple[str, str]]:
    """The (layer, stat) series :func:`result` reads of a run with these blocks."""
    keys: list[tuple[str, str]] = []
    for p in exp.panels:
        if p.reduce == "growth":
            keys += [(layer, s) for layer in layers for s in p.stats]
        else:
            layer = (layers[-1] if layers else "") if p.layer == "last" else p.layer
            keys += [(layer, s) for s in p.stats]
    return list(dict.fromkeys(keys))


def _label(values: dict[str, Any], skip: str | None = None) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in values.items() if k != skip]
    return ", ".join(parts) or "run"


def _reduce(p: Panel, point: Point) -> float | None:
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
    hit = np.nonzero(vals >= (p.target or 0.0))[0]  # steps_to
    return float(steps[hit[0]]) if len(hit) else None


def _thin(steps: np.ndarray, vals: np.ndarray) -> tuple[list, list]:
    """At most MAX_POINTS of the measured points (steps without a measurement, NaN, dropped),
    each bucket's extremes kept (bncore.downsample)."""
    steps, vals = measured(steps, vals, MAX_POINTS)
    return steps.tolist(), [float(v) for v in vals]


def result(exp: Experiment, points: Sequence[Point]) -> dict[str, Any]:
    """The experiment's panels from its runs: {"title", "claim", "note", "panels": [{"title",
    "kind", "x_label", "y_label", "log_x", "series": [{"name", "x", "y", "theory"}]}]}."""
    panels = []
    for p in exp.panels:
        series: list[dict[str, Any]] = []
        if p.kind == "over_steps":
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
                    {"name": name, "x": xs, "y": [_reduce(p, m) for m in members], "theory": False}
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
                "x_label": "step" if p.kind == "over_steps" else (p.x or ""),
                "y_label": p.y_label,
                "log_x": p.log_x,
                "series": series,
            }
        )
    return {"title": exp.title, "claim": exp.claim, "note": exp.note, "panels": panels}


def _yang(config: dict[str, Any]) -> float:
    return gradient_explosion_rate(
        get_field(config, "model.activation"), get_field(config, "batch_size")
    )


_MLP = {"kind": "mlp", "depth": 4, "width": 128, "activation": "relu"}
EPOCHS = 3


@functools.cache
def _train_size(name: DatasetName) -> int:
    return len(load_dataset(DataConfig(name=name)).x_train)


def _same_epochs(point: dict[str, Any]) -> dict[str, Any]:
    """Wu & He's protocol: equal epochs (of digits) at every batch size, learning rate linear
    in it."""
    bs = point["batch_size"]
    return {"steps": math.ceil(EPOCHS * _train_size("digits") / bs), "optim.lr": 0.1 * bs / 32}


_TEST_ACC = Panel("Test accuracy", "over_steps", ("test_acc",), "test accuracy")

EXPERIMENTS: dict[str, Experiment] = {
    e.key: e
    for e in (
        Experiment(
            key="bn-vs-learning-rate",
            title="BN vs no BN across learning rates",
            claim="With BN a network trains over a much wider range of learning rates and "
            "reaches a given accuracy in fewer steps (Ioffe & Szegedy 2015; Santurkar et al. "
            "2018; Bjorck et al. 2018).",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 800,
                  "eval_interval": 50, "stats_interval": 10},
            grid={"optim.lr": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                  "norm.kind": ["batch", "none"]},
            panels=(
                Panel("Best test accuracy by learning rate", "by_value", ("test_acc",),
                      "best test accuracy", x="optim.lr", log_x=True, reduce="best"),
                Panel("Steps to 50% test accuracy (missing: never reached)", "by_value",
                      ("test_acc",), "steps", x="optim.lr", log_x=True, reduce="steps_to",
                      target=0.5),
            ),
            full={"steps": 10_000, "model.width": 512, "model.depth": 8},
        ),
        Experiment(
            key="ioffe-szegedy-figure-1",
            title="Ioffe & Szegedy 2015, Figure 1",
            claim="A 3 x 100 sigmoid network trains faster and higher with BN, and the "
            "distribution of a last-layer sigmoid input (its 15/50/85th percentiles) stays "
            "stable with BN while it drifts without (Ioffe & Szegedy 2015, Figure 1).",
            base={"model": {"kind": "mlp", "depth": 3, "width": 100, "activation": "sigmoid"},
                  "data": {"name": "mnist1d"}, "batch_size": 60, "steps": 3000,
                  "eval_interval": 100, "stats_interval": 10,
                  "optim": {"lr": 0.5, "momentum": 0.0}},  # the paper's plain SGD
            grid={"norm.kind": ["batch", "none"]},
            panels=(
                _TEST_ACC,
                Panel("Last layer, tracked unit 0: 15/50/85th percentiles of its sigmoid input",
                      "over_steps", ("p15_0", "p50_0", "p85_0"), "sigmoid input", layer="last"),
            ),
            full={"steps": 50_000},
            note="The paper trains on MNIST for 50k steps with plain SGD (with momentum 0.9, "
            "BN's tracked input drifts too: its median ends at -2.9 against -0.5 with plain "
            "SGD); this uses MNIST-1D (made offline). "
            'For MNIST, start it with overrides {"data.name": "mnist", "data.path": DIR}.',
        ),
        Experiment(
            key="gradient-explosion",
            title="Gradient explosion at initialization (Yang et al. 2019)",
            claim="At initialization the gradient of a deep fully connected BN network grows "
            "geometrically towards the input, at a rate per layer that mean field theory gives "
            "for each batch size B: (B-2)/(B-3) for a linear network, and for ReLU 1.79 at B=8 "
            "falling towards pi/(pi-1) = 1.467 as B grows (Yang et al. 2019).",
            # Gaussian inputs of the width's dimension: the theory's batches are full-rank (digits'
            # 64 features missed (B-2)/(B-3) by 2-6x the excess at B >= 32)
            base={"model": {"kind": "mlp", "depth": 24, "width": 256},
                  "data": {"name": "gaussian", "features": 256}, "steps": 10,
                  "eval_interval": 10, "channel_interval": 1000,
                  "optim": {"lr": 1e-9, "momentum": 0.0}},
            grid={"model.activation": ["linear", "relu"], "batch_size": [8, 16, 32, 64, 128]},
            panels=(
                Panel("Squared-gradient growth per layer, measured and in theory", "by_value",
                      ("grad_in_norm",), "growth per layer", x="batch_size", log_x=True,
                      reduce="growth", theory=_yang, theory_label="Yang et al. mean field"),
            ),
            full={"model.depth": 40, "model.width": 1024, "data.features": 1024},
            note="Measured over 10 steps at a learning rate of 1e-9 (the weights stay at their "
            "initialization). The ReLU line is the paper's finite-B mean field rate "
            "(bncore.theory.mean_field_rate), not its large-batch limit.",
        ),
        Experiment(
            key="batch-size-bn-vs-groupnorm",
            title="Batch size: BN against GroupNorm",
            claim="BN's accuracy falls sharply as the batch shrinks below about 8 examples, "
            "because its statistics get noisy and differ from the running ones used at test "
            "time; GroupNorm does not depend on the batch and stays flat (Wu & He 2018, "
            "Figure 1).",
            base={"model": {"kind": "mlp", "depth": 3, "width": 64}, "data": {"name": "digits"},
                  "eval_interval": 100, "stats_interval": 10},
            grid={"batch_size": [2, 4, 8, 16, 32, 64, 128], "norm.kind": ["batch", "group"]},
            derive=_same_epochs,
            panels=(
                Panel("Final test accuracy by batch size", "by_value", ("test_acc",),
                      "test accuracy", x="batch_size", log_x=True, reduce="final"),
                Panel("Train/eval-mode gap by batch size", "by_value", ("mode_gap",),
                      "relative logit gap", x="batch_size", log_x=True, reduce="final"),
            ),
            full={"model.width": 256},
            note=f"As in the paper, every batch size trains for the same epochs ({EPOCHS} of "
            "digits' 1438 training examples) with the learning rate scaled with the batch "
            "(0.1 x B / 32). An MLP: each channel's batch statistics come from B values only "
            "(a CNN on 8x8 images pools 64 positions per example and hides the effect).",
        ),
        Experiment(
            key="placement",
            title="BN before or after the activation",
            claim="Ioffe & Szegedy put BN before the nonlinearity; in practice placing it after "
            "trains about as well, and the bias of the layer before BN is useless, since BN "
            "subtracts it again (its gradient is zero).",
            base={"model": {**_MLP, "bias": True}, "data": {"name": "mnist1d"},
                  "batch_size": 64, "steps": 1000, "eval_interval": 50, "stats_interval": 10,
                  "optim": {"lr": 0.1}},
            grid={"norm.placement": ["before_activation", "after_activation"]},
            panels=(
                _TEST_ACC,
                Panel("Gradient norm of the last layer's own bias (zero when BN follows it)",
                      "over_steps", ("layer_bias_grad_norm",), "bias gradient norm",
                      layer="last"),
                Panel("Share of dead ReLUs, last layer", "over_steps", ("act_dead",),
                      "dead units", layer="last"),
            ),
            full={"steps": 10_000},
            note="Every layer keeps its bias here (model.bias), so that its gradient shows.",
        ),
        Experiment(
            key="running-statistics",
            title="Running statistics: momentum and the train/eval gap",
            claim="Evaluation uses running averages of the batch statistics; a small momentum "
            "averages over many batches and lags behind while the weights move, which shows as "
            "a gap between train-mode and eval-mode outputs. PyTorch's momentum 0.1 is Keras' "
            "0.9 (the weight of the old value).",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 1000,
                  "eval_interval": 50, "stats_interval": 10, "optim": {"lr": 0.1}},
            grid={"norm.momentum": [0.001, 0.01, 0.1, 0.5]},
            panels=(
                Panel("Train/eval-mode gap over training", "over_steps", ("mode_gap",),
                      "relative logit gap"),
                Panel("Final test accuracy by momentum", "by_value", ("test_acc",),
                      "test accuracy", x="norm.momentum", log_x=True, reduce="final"),
            ),
            full={"steps": 10_000},
        ),
        Experiment(
            key="pytorch-vs-keras",
            title="Running statistics: PyTorch's and Keras' defaults",
            claim="The same word means opposite things: PyTorch's momentum 0.1 weighs the new "
            "batch, Keras' 0.99 the old average, so by default Keras' running statistics "
            "average over about ten times more batches (and it adds eps 1e-3, not 1e-5, and "
            "feeds the biased variance); early in training its eval-mode outputs lag further "
            "behind.",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 600,
                  "eval_interval": 25, "stats_interval": 10, "optim": {"lr": 0.1}},
            grid={"norm.convention": ["pytorch", "keras"]},
            panels=(
                Panel("Train/eval-mode gap over training", "over_steps", ("mode_gap",),
                      "relative logit gap"),
                Panel("Running mean against the batch mean (RMS gap), last layer", "over_steps",
                      ("running_mean_gap",), "RMS gap", layer="last"),
                _TEST_ACC,
            ),
            full={"steps": 10_000},
        ),
        Experiment(
            key="noisy-bn",
            title="Noisy BN: injected covariate shift (Santurkar et al. 2018)",
            claim="Adding a random, step-to-step shift and scale after each BN layer (internal "
            "covariate shift on purpose) barely hurts: noisy BN trains about as well as BN and "
            "better than no BN, so reducing covariate shift is not what makes BN work "
            "(Santurkar et al. 2018, Figure 2).",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 1000,
                  "eval_interval": 50, "stats_interval": 10, "ics_interval": 20,
                  "optim": {"lr": 0.1}, "norm": {"noise_shift": 0.1, "noise_scale": 1.1}},
            grid={"norm.kind": ["batch", "noisy", "none"]},
            # noise of 10% of BN's unit scale: noise_shift 0.25 / noise_scale 1.25 already cost
            # 9 points of accuracy here (0.56 against 0.66)
            panels=(
                _TEST_ACC,
                Panel("Internal covariate shift of the last block, ||G - G'||", "over_steps",
                      ("ics",), "ICS", layer="last"),
                Panel("cos(G, G') of the last block: 1 is no shift", "over_steps",
                      ("ics_cos",), "cosine", layer="last"),
            ),
            full={"steps": 10_000, "model.depth": 8},
            note="ICS as Santurkar et al. define it: the change of a block's weight gradient on "
            "the same batch once the blocks below took their step (bncore.landscape).",
        ),
        Experiment(
            key="landscape",
            title="Landscape smoothness with and without BN (Santurkar et al. 2018)",
            claim="With BN the loss changes less, and the gradient stays more predictive, along "
            "the gradient direction: the landscape is smoother (a smaller effective "
            "beta-smoothness), which lets larger steps work (Santurkar et al. 2018, Figure 4).",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 1000,
                  "eval_interval": 50, "stats_interval": 10, "landscape": True,
                  "optim": {"lr": 0.1}},
            grid={"norm.kind": ["batch", "none"]},
            panels=(
                Panel("Loss landscape: range of the loss along the gradient (0.5-4 lr)",
                      "over_steps", ("landscape_loss_range",), "max - min loss"),
                Panel("Gradient predictiveness: largest ||g(w - eta g) - g(w)||", "over_steps",
                      ("grad_change",), "gradient change"),
                Panel("Effective beta-smoothness", "over_steps", ("beta_smoothness",),
                      "max ||dg|| / ||eta g||"),
            ),
            full={"steps": 10_000, "model.depth": 8},
        ),
    )
}  # fmt: skip

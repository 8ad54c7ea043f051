"""Whether an experiment's runs agree with its paper: one check per experiment, each saying in
one sentence what was measured, with the numbers, and (where it disagrees) where.

A check reads the runs' series as :func:`bncore.science.experiments.framework.result` has them; it
raises :class:`Missing` while a run or a measurement it needs is not there yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bncore.run.config import get_field
from bncore.science.experiments.framework import Missing, Panel, Point, Verdict, reduce_point
from bncore.science.theory import gradient_explosion_rate

__all__ = ["CHECKS"]


def _pick(points: Sequence[Point], **values: Any) -> Point:
    """The run at these grid values (dotted names with '__' for '.')."""
    want = {k.replace("__", "."): v for k, v in values.items()}
    for p in points:
        if all(p.values.get(k) == v for k, v in want.items()):
            return p
    raise Missing(f"no run at {want}")


def _values(point: Point, stat: str, layer: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a series, the non-finite values left out; Missing if none."""
    name = (point.layers[-1] if point.layers else "") if layer == "last" else layer
    steps, vals = point.series.get((name, stat), (np.empty(0), np.empty(0)))
    ok = np.isfinite(vals)
    if not ok.any():
        raise Missing(f"no {stat} at {name!r}")
    return np.asarray(steps)[ok], np.asarray(vals, np.float64)[ok]


def _final(point: Point, stat: str, layer: str = "", last: int = 1) -> float:
    """The mean of the last ``last`` values."""
    return float(_values(point, stat, layer)[1][-last:].mean())


def _best(point: Point, stat: str) -> float:
    return float(_values(point, stat)[1].max())


def _grid(points: Sequence[Point], key: str) -> list[Any]:
    """The values of grid field ``key`` that the runs have (None, where tried, left out)."""
    found = sorted({p.values[key] for p in points if p.values.get(key) is not None})
    if not found:
        raise Missing(f"no runs over {key}")
    return found


def _yes(ok: bool) -> str:
    return "agrees" if ok else "does not agree"


def bn_vs_learning_rate(points: Sequence[Point]) -> Verdict:
    lrs = _grid(points, "optim.lr")
    best = {
        (lr, k): _best(_pick(points, optim__lr=lr, norm__kind=k), "test_acc")
        for lr in lrs
        for k in ("batch", "none")
    }
    top = max(best.values())
    good = {k: [lr for lr in lrs if best[lr, k] >= top - 0.1] for k in ("batch", "none")}
    ok = len(good["batch"]) > len(good["none"])

    def span(k: str) -> str:
        return f"{min(good[k]):g} to {max(good[k]):g}" if good[k] else "none"

    return Verdict(
        ok,
        f"Best test accuracy within 10 points of the top ({top:.2f}) at "
        f"{len(good['batch'])} of {len(lrs)} learning rates with BN ({span('batch')}) "
        f"and at {len(good['none'])} without ({span('none')}): this {_yes(ok)} with "
        "the claim of a wider range with BN.",
    )


def ioffe_szegedy(points: Sequence[Point]) -> Verdict:
    bn, none = _pick(points, norm__kind="batch"), _pick(points, norm__kind="none")
    acc = {k: _final(p, "test_acc") for k, p in (("bn", bn), ("none", none))}
    drift = {}
    for k, p in (("bn", bn), ("none", none)):
        median = _values(p, "p50_0", "last")[1]
        drift[k] = float(abs(median[-1] - median[0]))
    ok = acc["bn"] >= acc["none"] - 0.01 and drift["bn"] < drift["none"]
    return Verdict(
        ok,
        f"Final test accuracy {acc['bn']:.2f} with BN against {acc['none']:.2f} "
        f"without; the tracked sigmoid input's median moved by {drift['bn']:.2f} with "
        f"BN and {drift['none']:.2f} without: this {_yes(ok)} with the paper.",
    )


def gradient_explosion(panel: Panel) -> Any:
    def check(points: Sequence[Point]) -> Verdict:
        errors = []
        for p in points:
            rate = reduce_point(panel, p)
            if rate is None:
                raise Missing("growth not measured yet")
            theory = gradient_explosion_rate(
                get_field(p.config, "model.activation"), get_field(p.config, "batch_size")
            )
            errors.append((abs(rate - theory) / theory, p.values))
        if not errors:
            raise Missing("no runs")
        worst, at = max(errors, key=lambda e: e[0])
        ok = worst <= 0.05
        where = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in at.items())
        return Verdict(
            ok,
            f"The measured growth per layer is within {100 * worst:.1f}% of "
            f"Yang et al.'s rate at every batch size (the largest error at {where}): "
            f"this {_yes(ok)} with the theory (5% allowed).",
        )

    return check


def batch_size_groupnorm(points: Sequence[Point]) -> Verdict:
    sizes = _grid(points, "batch_size")
    acc = {
        (b, k): _final(_pick(points, batch_size=b, norm__kind=k), "test_acc")
        for b in sizes
        for k in ("batch", "group")
    }
    drop = {k: max(acc[b, k] for b in sizes) - acc[sizes[0], k] for k in ("batch", "group")}
    ok = drop["batch"] >= 0.1 and drop["batch"] > drop["group"] + 0.05
    return Verdict(
        ok,
        f"At batch size {sizes[0]}, BN's test accuracy is {acc[sizes[0], 'batch']:.2f}"
        f", {drop['batch']:.2f} under its best; GroupNorm's "
        f"{acc[sizes[0], 'group']:.2f}, {drop['group']:.2f} under its best: this "
        f"{_yes(ok)} with Wu & He.",
    )


def placement(points: Sequence[Point]) -> Verdict:
    before = _pick(points, norm__placement="before_activation")
    after = _pick(points, norm__placement="after_activation")
    acc_b, acc_a = _final(before, "test_acc", last=3), _final(after, "test_acc", last=3)
    bias_b = float(np.median(_values(before, "layer_bias_grad_norm", "last")[1]))
    bias_a = float(np.median(_values(after, "layer_bias_grad_norm", "last")[1]))
    ok = abs(acc_b - acc_a) <= 0.05 and bias_b <= 1e-4 * max(bias_a, 1e-12)
    return Verdict(
        ok,
        f"Final test accuracy {acc_b:.2f} with BN before the activation and "
        f"{acc_a:.2f} after; the last layer's bias gradient norm is {bias_b:.1e} "
        f"before (BN cancels it) against {bias_a:.1e} after: this {_yes(ok)}.",
    )


def running_statistics(points: Sequence[Point]) -> Verdict:
    moms = _grid(points, "norm.momentum")
    gap = {
        m: float(np.mean(_values(_pick(points, norm__momentum=m), "mode_gap")[1][1:])) for m in moms
    }
    acc = {m: _final(_pick(points, norm__momentum=m), "test_acc") for m in moms}
    ok = gap[moms[0]] > gap[moms[-1]] and acc[moms[0]] <= max(acc.values())
    return Verdict(
        ok,
        f"Mean train/eval-mode gap {gap[moms[0]]:.3f} at momentum {moms[0]:g} "
        f"against {gap[moms[-1]]:.3f} at {moms[-1]:g}; final test accuracy "
        f"{acc[moms[0]]:.2f} against {acc[moms[-1]]:.2f}: this {_yes(ok)} with the "
        "claim that a small momentum lags behind.",
    )


def pytorch_vs_keras(points: Sequence[Point]) -> Verdict:
    early = {}
    for conv in ("pytorch", "keras"):
        _, gap = _values(_pick(points, norm__convention=conv), "mode_gap")
        early[conv] = float(gap[1 : max(2, len(gap) // 3)].mean())
    ok = early["keras"] > early["pytorch"]
    return Verdict(
        ok,
        f"Over the first third of training the train/eval-mode gap averages "
        f"{early['keras']:.3f} with Keras' defaults against {early['pytorch']:.3f} "
        f"with PyTorch's: this {_yes(ok)} with the claim.",
    )


def noisy_bn(points: Sequence[Point]) -> Verdict:
    seeds = _grid(points, "seed")
    acc = {k: float(np.mean([_final(_pick(points, norm__kind=k, seed=s), "test_acc", last=3)
                             for s in seeds]))
           for k in ("batch", "noisy", "none")}  # fmt: skip
    near = acc["noisy"] >= acc["batch"] - 0.03
    better = acc["noisy"] > acc["none"]
    gain = acc["batch"] - acc["none"]
    kept = (acc["noisy"] - acc["none"]) / gain if gain > 0 else float("nan")
    parts = (f"noisy BN {acc['noisy']:.3f}, BN {acc['batch']:.3f}, no BN {acc['none']:.3f} "
             f"(noisy BN keeps {100 * kept:.0f}% of BN's gain)")  # fmt: skip
    said = f"Final test accuracy (last 3 evaluations, mean of {len(seeds)} seeds): {parts}"
    if near and better:
        return Verdict(True, f"{said}: noisy BN trains about as well as BN and better than no "
                       "BN, as the paper found.")  # fmt: skip
    where = ("it trains better than no BN but not about as well as BN (3 points allowed)"
             if better else "it does not train better than no BN")  # fmt: skip
    return Verdict(False, f"{said}: {where}, so this measurement does not agree with the paper "
                   "in full.")  # fmt: skip


def landscape_check(points: Sequence[Point]) -> Verdict:
    names = {"landscape_loss_range": "loss range", "grad_change": "gradient change",
             "beta_smoothness": "beta-smoothness"}  # fmt: skip
    seeds = _grid(points, "seed")
    per_seed: dict[str, list[tuple[float, float]]] = {s: [] for s in names}
    for seed in seeds:
        bn = _pick(points, norm__kind="batch", seed=seed)
        none = _pick(points, norm__kind="none", seed=seed)
        # only where both networks learn: on a plateau the landscape is flat, trivially smooth
        learning: set[int] | None = None
        for p in (bn, none):
            steps, loss = _values(p, "train_loss")
            moved = set(steps[loss < 0.9 * loss[0]].tolist())
            learning = moved if learning is None else learning & moved
        if not learning:
            raise Missing("the networks have not both started to learn")
        at = sorted(learning)

        def mean(p: Point, stat: str, at: list[int] = at) -> float:
            steps, vals = _values(p, stat)
            return float(np.mean(vals[np.isin(steps, at)]))

        for stat in names:
            per_seed[stat].append((mean(bn, stat), mean(none, stat)))
    means = {s: tuple(np.mean(v, axis=0)) for s, v in per_seed.items()}
    wins = {s: sum(a < b for a, b in v) for s, v in per_seed.items()}
    parts = "; ".join(
        f"{names[s]} {a:.3g} with BN, {b:.3g} without (BN smaller on {wins[s]} of {len(seeds)})"
        for s, (a, b) in means.items()
    )
    smaller = [s for s, (a, b) in means.items() if a < b]
    ok = len(smaller) == len(names)
    where = (
        ""
        if ok
        else (
            " (BN is not smoother in: "
            + ", ".join(names[s] for s in names if s not in smaller)
            + ")"
        )
    )
    return Verdict(
        ok,
        f"Averaged over the evaluations where both networks learn and over "
        f"{len(seeds)} seeds: {parts}: this {_yes(ok)} with the paper{where}.",
    )


def ema_vs_precise(points: Sequence[Point]) -> Verdict:
    moms = _grid(points, "norm.momentum")
    gain = {}
    for m in moms:
        p = _pick(points, norm__momentum=m)
        _, ema = _values(p, "test_acc")
        _, precise = _values(p, "test_acc_precise")
        n = min(len(ema), len(precise))
        gain[m] = float(np.mean(precise[1:n] - ema[1:n]))
    ok = gain[moms[0]] > 0.02 and gain[moms[0]] > gain[moms[-1]]
    return Verdict(
        ok,
        f"PreciseBN's statistics give {100 * gain[moms[0]]:.1f} points more test "
        f"accuracy than the EMA's on average over training at momentum {moms[0]:g}, "
        f"{100 * gain[moms[-1]]:.1f} at {moms[-1]:g}: this {_yes(ok)} with Wu & "
        "Johnson (a lagging EMA costs accuracy; PreciseBN gives it back).",
    )


def frozen_bn(points: Sequence[Point]) -> Verdict:
    sizes = _grid(points, "batch_size")
    gain = {}
    for b in sizes:
        frozen = _final(_pick(points, batch_size=b, norm__freeze_after=0.75), "test_acc", last=2)
        plain = _final(_pick(points, batch_size=b, norm__freeze_after=None), "test_acc", last=2)
        gain[b] = frozen - plain
    inconsistency = {}
    for b in (sizes[0], sizes[-1]):
        p = _pick(points, batch_size=b, norm__freeze_after=None)
        inconsistency[b] = _final(p, "test_acc", last=2) - _final(p, "test_acc_batch", last=2)
    ok = gain[sizes[0]] > 0 and gain[sizes[0]] >= gain[sizes[-1]]
    return Verdict(
        ok,
        f"FrozenBN for the last quarter changes the final test accuracy by "
        f"{100 * gain[sizes[0]]:+.1f} points at batch size {sizes[0]} and "
        f"{100 * gain[sizes[-1]]:+.1f} at {sizes[-1]}; population statistics beat "
        f"the batch's own at test time by {100 * inconsistency[sizes[0]]:+.1f} points"
        f" at {sizes[0]} and {100 * inconsistency[sizes[-1]]:+.1f} at {sizes[-1]}: "
        f"this {_yes(ok)} with Wu & Johnson's FrozenBN finding.",
    )


def signal_propagation_check(points: Sequence[Point]) -> Verdict:
    def profile(p: Point, stat: str) -> np.ndarray:
        vals = [_values(p, stat, layer)[1][0] for layer in p.layers if layer.endswith(".b")]
        if not vals:
            raise Missing("no signal propagation yet")
        return np.asarray(vals)

    def growth(p: Point) -> float:
        """The output variance's growth per block through the first stage (geometric mean;
        later stages start with channels that He et al.'s shortcut pads with zeros)."""
        var, n = profile(p, "signal_var"), int(get_field(p.config, "model.depth"))
        if n < 2:
            raise Missing("one block per stage: no growth within a stage")
        return float((var[n - 1] / var[0]) ** (1 / (n - 1)))

    bn = _pick(points, norm__kind="batch", model__skip_init=False)
    raw = _pick(points, norm__kind="none", model__skip_init=False)
    skip = _pick(points, norm__kind="none", model__skip_init=True)
    g_bn, g_raw, g_skip = growth(bn), growth(raw), growth(skip)
    var_bn, branch = profile(bn, "signal_var"), profile(bn, "branch_var")
    n = int(get_field(bn.config, "model.depth"))
    step = float(np.mean(np.diff(var_bn[:n]))) if n > 1 else float("nan")
    ok = g_bn < 1.3 and g_raw >= 1.5 and abs(g_skip - 1) < 0.05
    return Verdict(
        ok,
        f"Through the first stage, at initialization, each residual block multiplies the "
        f"output variance by {g_bn:.2f} with BN (it adds {step:.2f} per block in the "
        f"first stage, about the branch variance {branch[:n].mean():.2f}: linear "
        f"growth), by {g_raw:.2f} without normalization (exponential), and by "
        f"{g_skip:.3f} with SkipInit: this {_yes(ok)} with Brock et al. and De & "
        "Smith.",
    )


def scale_invariance(points: Sequence[Point]) -> Verdict:
    wds = _grid(points, "optim.weight_decay")
    free, decayed = (
        _pick(points, optim__weight_decay=wds[0]),
        _pick(points, optim__weight_decay=wds[-1]),
    )
    norm_free = _values(free, "weight_norm", "last")[1]
    eff_free = _values(free, "eff_lr", "last")[1]
    norm_dec = _values(decayed, "weight_norm", "last")[1]
    grows = norm_free[-1] > 1.2 * norm_free[0] and eff_free[-1] < eff_free[0]
    held = norm_dec[-1] < norm_free[-1]
    ok = wds[0] == 0 and grows and held
    return Verdict(
        ok,
        f"Without weight decay the last block's weight norm grows from "
        f"{norm_free[0]:.2f} to {norm_free[-1]:.2f} and its effective learning rate "
        f"falls from {eff_free[0]:.3g} to {eff_free[-1]:.3g}; with weight decay "
        f"{wds[-1]:g} the norm ends at {norm_dec[-1]:.2f}: this {_yes(ok)} with the "
        "scale-invariance papers.",
    )


def sync_bn(points: Sequence[Point]) -> Verdict:
    sizes = _grid(points, "batch_size")
    small, large = sizes[0], sizes[-1]
    acc = {(b, s): _final(_pick(points, batch_size=b, distributed__sync_bn=s), "test_acc", last=2)
           for b in (small, large) for s in (False, True)}  # fmt: skip
    cost = {}
    for b in (small, large):
        times = [float(np.median(_values(_pick(points, batch_size=b, distributed__sync_bn=s),
                                         "step_time")[1])) for s in (False, True)]  # fmt: skip
        cost[b] = times[1] / times[0]
    gain_small = acc[small, True] - acc[small, False]
    gain_large = acc[large, True] - acc[large, False]
    ok = gain_small > 0.02 and gain_small > gain_large
    return Verdict(
        ok,
        f"At a global batch of {small} ({small // 2} per replica) synchronized BN "
        f"reaches {acc[small, True]:.2f} against {acc[small, False]:.2f} per replica "
        f"({100 * gain_small:+.1f} points); at {large}, {100 * gain_large:+.1f}; a step "
        f"takes {cost[small]:.2f}x and {cost[large]:.2f}x as long synchronized: this "
        f"{_yes(ok)} with the finding that per-replica statistics are what small "
        "batches cost.",
    )


#: Checks by experiment key (gradient-explosion's is made with its panel).
CHECKS = {
    "bn-vs-learning-rate": bn_vs_learning_rate,
    "ioffe-szegedy-figure-1": ioffe_szegedy,
    "batch-size-bn-vs-groupnorm": batch_size_groupnorm,
    "placement": placement,
    "running-statistics": running_statistics,
    "pytorch-vs-keras": pytorch_vs_keras,
    "noisy-bn": noisy_bn,
    "landscape": landscape_check,
    "ema-vs-precise-bn": ema_vs_precise,
    "small-batch-frozen-bn": frozen_bn,
    "signal-propagation": signal_propagation_check,
    "scale-invariance": scale_invariance,
    "per-replica-vs-sync-bn": sync_bn,
}

"""Pitfalls seen channel by channel: dead channels, constant channels, weight decay that sets
gamma."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from bncore.diagnose.facts import RunFacts
from bncore.diagnose.findings import Diagnosis, Finding
from bncore.diagnose.rules.base import Rule
from bncore.diagnose.view import RecordsView, sustained

__all__ = ["ConstantChannel", "DeadChannels", "WeightDecayOnNorm"]


def _rows(table: dict[str, np.ndarray], column: str) -> list[np.ndarray]:
    """A per-channel column as one float array per row (ragged or not)."""
    col = table[column]
    return [np.asarray(r, dtype=np.float64) for r in col]


class DeadChannels(Rule):
    id = "dead-channels"
    severity = "warning"
    checks = "dead channels (gamma near 0, or a ReLU that never fires)"
    threshold = (
        "More than 10% of a layer's channels are dead at two kept steps in a row (per-channel "
        "records, every channel_interval steps): |gamma| under 1% of the layer's median "
        "|gamma|, or, where a ReLU takes BN's output, beta/|gamma| < -3 (x_hat is about "
        "N(0, 1), so the ReLU passes less than 0.14% of the values); or the share of units "
        "dead for the whole batch (act_dead) is above 50% for 3 logged steps in batches of 32 "
        "or more (in a smaller batch a live unit often misses every example). A gamma zero "
        "at initialization on purpose (the last BN of a residual branch, Goyal et al. 2017) "
        "is exempt for the first 10% of the run."
    )
    fix = (
        "a lower learning rate or weight decay on gamma (exclude norm parameters from weight "
        "decay); LeakyReLU; or prune the channels on purpose (network slimming)"
    )
    references = (
        "Frankle, Schwab, Morcos 2021, Training BatchNorm and Only BatchNorm",
        "Eric-mingjie/network-slimming#46",
        "Lam1360/YOLOv3-model-pruning#80",
        "tensorpack/tensorpack#420",
    )
    needs = (("channels.gamma", "channels.beta"), ("layers.act_dead",))
    SHARE, RATIO, BIAS, DEAD_UNITS = 0.1, 0.01, -3.0, 0.5

    def __init__(self) -> None:
        self.carry: dict[str, int] = {}
        self.units_carry: dict[str, int] = {}
        self.done: set[str] = set()

    def _exempt(self, name: str, step: int, facts: RunFacts) -> bool:
        if not facts.layer(name).zero_init_gamma:
            return False
        return step < 0.1 * (facts.steps_total or 10_000)

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        hits: list[tuple[int, str, dict]] = []
        for name, rows in view.channels.items():
            if name in self.done or "gamma" not in rows or "beta" not in rows:
                continue
            relu = facts.layer(name).activation == "relu"
            shares = []
            for step, g, b in zip(rows["step"], _rows(rows, "gamma"), _rows(rows, "beta"),
                                  strict=True):  # fmt: skip
                ok = np.isfinite(g) & np.isfinite(b)
                if not ok.any() or self._exempt(name, int(step), facts):
                    shares.append(0.0)
                    continue
                g, b = np.abs(g[ok]), b[ok]
                dead = g < self.RATIO * np.median(g)
                if relu:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        dead |= b / g < self.BIAS
                shares.append(float(dead.mean()))
            share = np.asarray(shares)
            at, self.carry[name] = sustained(share > self.SHARE, 2, self.carry.get(name, 0))
            if at is not None:
                self.done.add(name)
                hits.append((int(rows["step"][at]), name,
                             {"dead_share": share[at], "threshold": self.SHARE}))  # fmt: skip
        for name, rows in view.layers.items():
            if name in self.done or "act_dead" not in rows:
                continue
            # dead for the whole batch means dead only where the batch is large enough for a
            # live unit to fire in it: (1 - p)^N is small for N >= 32
            n = (
                rows["batch_n"]
                if "batch_n" in rows
                else np.full(len(rows["step"]), facts.batch or 0)
            )
            dead = (np.nan_to_num(rows["act_dead"]) > self.DEAD_UNITS) & (np.nan_to_num(n) >= 32)
            at, self.units_carry[name] = sustained(dead, 3, self.units_carry.get(name, 0))
            if at is not None and not self._exempt(name, int(rows["step"][at]), facts):
                self.done.add(name)
                hits.append(
                    (
                        int(rows["step"][at]),
                        name,
                        {"act_dead": rows["act_dead"][at], "threshold": self.DEAD_UNITS},
                    )
                )
        if hits:
            hits.sort()
            step, name, evidence = hits[0]
            what = (
                f"{evidence['dead_share']:.0%} of its channels are dead"
                if "dead_share" in evidence
                else f"{evidence['act_dead']:.0%} of its units never fire"
            )
            yield Finding(
                step, [n for _, n, _ in hits], evidence,
                f"{name}: {what} (gamma near zero, or a ReLU that never passes anything): "
                "they no longer learn",
            )  # fmt: skip


class ConstantChannel(Rule):
    id = "constant-channel"
    severity = "warning"
    checks = "channels whose batch variance is next to nothing (under 1% of eps)"
    threshold = (
        "A channel's batch variance stays below 1% of the layer's eps and 1% of the layer's "
        "mean channel variance for 10 logged steps in a row (pre_var_min, the least channel "
        "variance, is recorded at every logged step): its normalized output's spread is under "
        "0.1 where its neighbours' is near 1, so it carries next to no signal (a dead filter "
        "upstream), its output is about beta, and the gradient through it is scaled by up to "
        "1/sqrt(eps) (316 at 1e-5). Below eps alone is not enough: MobileNet's and "
        "EfficientNet's depthwise layers (eps 1e-3) on small images have whole layers of "
        "variance under eps whose channels all carry their signal."
    )
    fix = (
        "find the dead filter upstream (a ReLU that never fires, a zeroed weight); raise eps "
        "(1e-3); a lower learning rate"
    )
    references = ("pytorch/pytorch#5410", "facebookresearch/SparseConvNet#190")
    needs = (("layers.pre_var_min", "layers.pre_var"),)
    STEPS, SHARE = 10, 0.01

    def __init__(self) -> None:
        self.carry: dict[str, int] = {}
        self.done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        for name, rows in view.layers.items():
            eps = facts.layer(name).eps or 1e-5
            least = rows["pre_var_min"]
            low = (least < self.SHARE * eps) & (least < self.SHARE * rows["pre_var"])
            at, self.carry[name] = sustained(low, self.STEPS, self.carry.get(name, 0))
            if at is not None:
                self.done = True
                v = float(rows["pre_var_min"][at])
                yield Finding(
                    int(rows["step"][at]), [name],
                    {"pre_var_min": v, "pre_var": float(rows["pre_var"][at]), "eps": eps,
                     "steps": self.STEPS},
                    f"a channel of {name} has had a batch variance of {v:.2g} (under 1% of "
                    f"eps {eps:g} and of its layer's mean) for {self.STEPS} logged steps: it "
                    "is constant",
                )  # fmt: skip
                return


class WeightDecayOnNorm(Rule):
    id = "weight-decay-on-norm"
    severity = "info"
    checks = "whether weight decay, not the loss, sets gamma"
    threshold = (
        "Weight decay lambda applies to gamma, and for more than half of a layer's channels "
        "lambda*|gamma| exceeds |dL/dgamma| at every kept step over at least 100 steps: the "
        "decay, not the loss, is what moves gamma (towards 0). Weight decay on gamma and beta "
        "can also help (Summers & Dinneen 2020), so only this state is reported, as info."
    )
    fix = (
        "exclude norm parameters from weight decay: param groups with weight_decay=0 for "
        "1-d parameters (timm's param_groups_weight_decay; BN Scope: optim.norm_weight_decay: "
        "false)"
    )
    references = (
        "Summers & Dinneen 2020, Four Things Everyone Should Know to Improve Batch Normalization",
        "ultralytics/yolov5#4104",
        "JiahuiYu/slimmable_networks#15",
    )
    needs = (("channels.gamma", "channels.gamma_grad"),)
    SHARE, SPAN = 0.5, 100

    def __init__(self) -> None:
        self.since: dict[str, int] = {}
        self.done = False

    def missing(self, columns: set[str], facts: RunFacts) -> str | None:
        if not any(layer.norm_weight_decay for layer in facts.layers.values()):
            if all(layer.norm_weight_decay == 0 for layer in facts.layers.values()):
                return "no weight decay on gamma"
            return "needs the optimizer's weight decay on gamma (watch(model, optimizer=opt))"
        return super().missing(columns, facts)

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        for name, rows in view.channels.items():
            wd = facts.layer(name).norm_weight_decay
            if not wd or "gamma_grad" not in rows:
                continue
            for step, g, dg in zip(rows["step"], _rows(rows, "gamma"),
                                   _rows(rows, "gamma_grad"), strict=True):  # fmt: skip
                share = float(np.mean(wd * np.abs(g) > np.abs(dg)))
                if share <= self.SHARE:
                    self.since.pop(name, None)
                    continue
                start = self.since.setdefault(name, int(step))
                if step - start >= self.SPAN:
                    self.done = True
                    yield Finding(
                        int(step), [name],
                        {"share_of_channels": share, "weight_decay": wd,
                         "threshold": self.SHARE, "steps": int(step) - start},
                        f"weight decay ({wd:g}) outweighs the loss's gradient on {share:.0%} "
                        f"of {name}'s gammas since step {start}: the decay is shrinking them",
                        severity="info",
                    )  # fmt: skip
                    return

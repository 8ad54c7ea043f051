"""What BN does to the optimization, worth knowing rather than wrong: the effective learning
rate of a scale-invariant weight, and the bias BN makes useless."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from bncore.diagnose.facts import RunFacts
from bncore.diagnose.findings import Diagnosis, Finding
from bncore.diagnose.rules.base import Rule
from bncore.diagnose.view import RecordsView, sustained

__all__ = ["BiasBeforeBN", "EffectiveLRDecay"]


class EffectiveLRDecay(Rule):
    id = "effective-lr-decay"
    severity = "info"
    checks = "the effective learning rate lr/||w||^2 of the weights BN follows"
    threshold = (
        "Without weight decay, a weight that BN follows is scale-invariant: its gradient is "
        "orthogonal to it, so its norm only grows under SGD and its effective learning rate "
        "lr/||w||^2 falls (van Laarhoven 2017; Hoffer et al. 2018; Arora et al. 2019). "
        "Reported when the weight decay is 0 and a layer's effective learning rate has "
        "fallen below half its first recorded value while the learning rate itself stayed "
        "within 10% of its start."
    )
    fix = (
        "add weight decay on the conv/linear weights (not on gamma/beta), or raise the "
        "learning rate; weight standardization"
    )
    references = (
        "van Laarhoven 2017, L2 Regularization versus Batch and Weight Normalization",
        "Hoffer, Banner, Golan, Soudry 2018, Norm matters",
        "Arora, Li, Lyu 2019, Theoretical analysis of auto rate-tuning by batch normalization",
    )
    needs = (("layers.eff_lr",), ("layers.weight_norm", "steps.lr"))
    FALL, FLAT = 0.5, 0.9

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, float]] = {}  # eff_lr, lr at the first record
        self.lr: dict[int, float] = {}
        self.done = False

    def missing(self, columns: set[str], facts: RunFacts) -> str | None:
        if facts.weight_decay is None:
            return "needs the optimizer's weight decay (watch(model, optimizer=opt))"
        if facts.weight_decay > 0:
            return "the weights have weight decay"
        return super().missing(columns, facts)

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done or facts.weight_decay != 0:
            return
        if "lr" in view.steps:
            self.lr.update(zip(map(int, view.steps["step"]), map(float, view.steps["lr"]),
                               strict=True))  # fmt: skip
        for name, rows in view.layers.items():
            for i, step in enumerate(rows["step"]):
                lr = self.lr.get(int(step), np.nan)
                if "eff_lr" in rows and np.isfinite(rows["eff_lr"][i]):
                    eff = float(rows["eff_lr"][i])
                elif "weight_norm" in rows and rows["weight_norm"][i] > 0:
                    eff = lr / float(rows["weight_norm"][i]) ** 2
                else:
                    continue
                if not (np.isfinite(eff) and np.isfinite(lr) and eff > 0):
                    continue
                eff0, lr0 = self.first.setdefault(name, (eff, lr))
                if eff < self.FALL * eff0 and lr >= self.FLAT * lr0:
                    self.done = True
                    yield Finding(
                        int(step), [name],
                        {"eff_lr_first": eff0, "eff_lr_now": eff, "lr_first": lr0, "lr_now": lr,
                         "threshold": self.FALL},
                        f"{name}'s weight grew: its effective learning rate lr/||w||^2 fell from "
                        f"{eff0:.3g} to {eff:.3g} with the learning rate flat, so BN is decaying "
                        "it (no weight decay holds the norm)",
                        severity="info",
                    )  # fmt: skip
                    return
        while len(self.lr) > 4096:
            self.lr.pop(next(iter(self.lr)))


class BiasBeforeBN(Rule):
    id = "bias-before-bn"
    severity = "info"
    checks = "a bias in the layer that feeds BN"
    threshold = (
        "The Linear/Conv feeding a BN layer has a bias: BN subtracts the batch mean, so the "
        "bias cancels and its gradient is zero (Ioffe & Szegedy 2015, section 3.2). Seen from "
        "the structure of a user's model, or in BN Scope's own runs from the bias's gradient "
        "norm, below 1e-6 of the weight's for 3 logged steps."
    )
    fix = "bias=False on the conv/linear layer before BN (nn.Conv2d(..., bias=False))"
    references = (
        "Ioffe & Szegedy 2015, Batch Normalization, section 3.2",
        "PyTorch performance tuning guide: disable bias for convolutions directly followed by "
        "a batch norm",
        "milesial/Pytorch-UNet#325",
    )
    needs = (("layers.layer_bias_grad_norm", "layers.weight_grad_norm"),
             ("facts.structure_known",))  # fmt: skip
    RATIO = 1e-6

    def __init__(self) -> None:
        self.carry: dict[str, int] = {}
        self.done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        hits: list[tuple[int, str, dict]] = []
        for name, rows in view.layers.items():
            if not len(rows["step"]):
                continue
            bias, weight = rows.get("layer_bias_grad_norm"), rows.get("weight_grad_norm")
            if bias is not None and weight is not None and np.isfinite(bias).any():
                with np.errstate(divide="ignore", invalid="ignore"):
                    useless = (bias / weight < self.RATIO) & np.isfinite(bias)
                at, self.carry[name] = sustained(useless, 3, self.carry.get(name, 0))
                if at is not None:
                    hits.append((int(rows["step"][at]), name, {
                        "bias_grad_norm": bias[at], "weight_grad_norm": weight[at],
                        "threshold_ratio": self.RATIO}))  # fmt: skip
            elif facts.source == "client" and facts.layer(name).bias_before:
                hits.append((int(rows["step"][0]), name, {"bias_before": True}))
        if hits:
            self.done = True
            hits.sort()
            layers = [n for _, n, _ in hits]
            yield Finding(
                hits[0][0], layers, hits[0][2],
                f"the layer feeding {layers[0]}"
                + (f" (and {len(layers) - 1} more)" if len(layers) > 1 else "")
                + " has a bias that BN cancels: it learns nothing",
                severity="info",
            )  # fmt: skip

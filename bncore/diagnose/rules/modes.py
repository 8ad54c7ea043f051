"""Pitfalls of train and eval mode: validation in train mode, BN left in eval mode, and the
symptom many of the others end in, eval-mode outputs far from train-mode ones."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import numpy as np

from bncore.diagnose.facts import RunFacts
from bncore.diagnose.findings import Diagnosis, Finding
from bncore.diagnose.rules.base import Rule, warmup
from bncore.diagnose.view import RecordsView, sustained

__all__ = ["BNEvalDuringTraining", "TrainEvalGap", "ValidationInTrainMode"]


class ValidationInTrainMode(Rule):
    id = "validation-in-train-mode"
    severity = "warning"
    checks = "training-mode BN forwards with autograd off"
    threshold = (
        "A training-mode BN forward runs with autograd disabled (torch.no_grad()): that is "
        "validation or testing without model.eval(). Its predictions depend on the batch's "
        "composition, and the validation data overwrite the running statistics. Near zero "
        "false positives; test-time adaptation (AdaBN, TENT) does it on purpose: silence it. "
        "Needs a user's records (forwards_no_grad)."
    )
    fix = (
        "model.eval() before validating (with torch.no_grad()), model.train() after; "
        "Lightning does both for you in validation_step"
    )
    references = (
        "prokia/drugVQA#7",
        "ando-khachatryan/HiDDeN#13",
        "layumi/Person_reID_baseline_pytorch#218",
        "openpifpaf/openpifpaf#308",
    )
    needs = (("layers.forwards_no_grad",),)

    def __init__(self) -> None:
        self.done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        hits: list[tuple[int, str, float]] = []
        for name, rows in view.layers.items():
            if "forwards_no_grad" not in rows:
                continue
            bad = np.nan_to_num(rows["forwards_no_grad"]) > 0
            if bad.any():
                i = int(np.argmax(bad))
                hits.append((int(rows["step"][i]), name, float(rows["forwards_no_grad"][i])))
        if hits:
            self.done = True
            hits.sort()
            step, name, count = hits[0]
            yield Finding(
                step, [n for _, n, _ in hits], {"forwards_no_grad": count, "threshold": 0},
                f"{name} ran {count:g} training-mode forward(s) with autograd off before step "
                f"{step}: validation in train mode, which overwrites the running statistics "
                "with validation data",
            )  # fmt: skip


class BNEvalDuringTraining(Rule):
    id = "bn-eval-during-training"
    severity = "warning"
    checks = "BN layers in eval mode while training goes on"
    threshold = (
        "A layer that ran in training mode has no training forward for 2 logged steps in a "
        "row while the loss keeps coming: the model was left in eval mode after validation "
        "(model.train() missing at the next epoch), or BN was frozen by mistake. BN modules "
        "that never run in training mode in the first 5 logged steps are listed as info: a "
        "frozen backbone is often intended."
    )
    fix = (
        "call model.train() at the start of every epoch (after validation); to freeze BN on "
        "purpose, override train() or use FrozenBatchNorm2d (timm's freeze_batch_norm_2d), "
        "and silence this"
    )
    references = (
        "pytorch/pytorch#66073",
        "pytorch/pytorch#86590",
        "pgniewko/gt-pyg#112",
        "isht7/pytorch-deeplab-resnet#39",
    )
    needs = (("layers.forwards",), ("facts.bn_modules",))
    STEPS, NEVER_AFTER = 2, 5

    def __init__(self) -> None:
        self.trained: set[str] = set()
        self.carry: dict[str, int] = {}
        self.logged = 0
        self.seen: set[str] = set()
        self.done: set[str] = set()
        self.never_done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        silent: list[tuple[int, str]] = []
        for name, rows in view.layers.items():
            self.seen.add(name)
            if "forwards" not in rows or name in self.done:
                continue
            k = np.nan_to_num(rows["forwards"])
            before = name in self.trained
            ran = k > 0
            trained_so_far = np.maximum.accumulate(ran) | before
            if ran.any():
                self.trained.add(name)
            idle = ~ran & trained_so_far & np.isfinite(view.loss_at(rows["step"]))
            at, self.carry[name] = sustained(idle, self.STEPS, self.carry.get(name, 0))
            if at is not None:
                self.done.add(name)
                silent.append((int(rows["step"][at]), name))
        if silent:
            silent.sort()
            step, name = silent[0]
            yield Finding(
                step, [n for _, n in silent], {"steps_without_training_forward": self.STEPS},
                f"{name} stopped running in training mode at step {step} while training goes "
                "on: the model (or this layer) was left in eval mode",
            )  # fmt: skip
        if view.steps:
            self.logged += len(view.steps.get("step", []))
        if not self.never_done and facts.bn_modules and self.logged >= self.NEVER_AFTER:
            self.never_done = True
            never = [m for m in facts.bn_modules if m not in self.seen]
            if never and view.last_step is not None:
                yield Finding(
                    view.last_step, never, {"never_in_train_mode": len(never)},
                    f"{len(never)} BN module(s) ({never[0]}"
                    + (", ..." if len(never) > 1 else "")
                    + ") never ran in training mode: frozen on purpose?",
                    severity="info",
                )  # fmt: skip


#: Diagnoses that explain a train/eval gap, in the order they are named.
CAUSES = (
    "nonfinite-running-stats",
    "momentum-convention",
    "running-stats-not-updating",
    "cumulative-momentum-in-training",
    "stale-running-stats",
    "batch-of-one",
    "small-batch",
    "ddp-without-syncbn",
    "grad-accumulation-micro-batch",
    "non-iid-batches",
    "dropout-before-bn",
    "validation-in-train-mode",
    "frozen-but-updating",
)


class TrainEvalGap(Rule):
    id = "train-eval-gap"
    severity = "warning"
    checks = "the gap between train-mode and eval-mode outputs"
    threshold = (
        "The mode gap (relative L2 distance between a fixed batch's outputs in train mode "
        "and in eval mode) is above 0.5 at three evaluations in a row after the EMA's "
        "warm-up, and not falling (the last at least 0.9 times the first). The diagnosis "
        "names the first layer, in execution order, whose eval-mode input is far from its "
        "running statistics (mean more than 1 standard deviation away, or variance off by "
        "more than 100%), and the other diagnoses that explain it. It clears when the gap "
        "falls below 0.5 again."
    )
    fix = (
        "fix the cause named; whatever it is, evaluating with population statistics "
        "(PreciseBN: torch.optim.swa_utils.update_bn) closes the gap the running statistics "
        "leave"
    )
    references = (
        "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, section 4",
        "pytorch/pytorch#5406",
        "pytorch/pytorch#4741",
        "discuss.pytorch.org/t/what-does-model-eval-do-for-batchnorm-layer/7146",
    )
    needs = (("evals.mode_gap",),)
    GAP, FAR = 0.5, 1.0

    def __init__(self) -> None:
        self.gaps: deque[tuple[int, float]] = deque(maxlen=3)
        self.inputs: dict[str, tuple[float, float]] = {}  # latest eval-mode input gaps
        self.first_step: int | None = None
        self.active = False
        self.causes: str | None = None  # the causes the diagnosis names now

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        for name, rows in view.layer_evals.items():
            if "eval_mean_gap" in rows and len(rows["eval_mean_gap"]):
                var = rows["eval_var_gap"][-1] if "eval_var_gap" in rows else np.nan
                self.inputs[name] = (float(rows["eval_mean_gap"][-1]), float(var))
        if not view.evals or "mode_gap" not in view.evals:
            return
        after = min((warmup(layer, facts) for layer in facts.layers.values()), default=0)
        for step, gap in zip(view.evals["step"], view.evals["mode_gap"], strict=True):
            if not np.isfinite(gap):
                continue
            if self.first_step is None:
                self.first_step = int(step)
            if step - self.first_step < after:
                continue
            self.gaps.append((int(step), float(gap)))
            found = self._judge(facts, active)
            if found is not None:
                yield found

    def _judge(self, facts: RunFacts, active: Mapping[str, Diagnosis]) -> Finding | None:
        steps, gaps = zip(*self.gaps, strict=True)
        if self.active and gaps[-1] < self.GAP and (len(gaps) < 2 or gaps[-2] < self.GAP):
            self.active = False
            return Finding(steps[-1], resolved=True)
        if self.active:  # explained by more than when it was found: say so
            found = self._account(facts, active, steps, gaps)
            if found.evidence.get("causes") == self.causes:
                return None
            self.causes = found.evidence.get("causes")
            found.refresh = True
            return found
        if len(gaps) < 3 or min(gaps) <= self.GAP or gaps[-1] < 0.9 * gaps[0]:
            return None
        self.active = True
        found = self._account(facts, active, steps, gaps)
        self.causes = found.evidence.get("causes")
        return found

    def _account(
        self,
        facts: RunFacts,
        active: Mapping[str, Diagnosis],
        steps: tuple[int, ...],
        gaps: tuple[float, ...],
    ) -> Finding:
        """The finding at the latest evaluation: the gap, its first layer, its causes."""
        order = list(facts.layers) or list(self.inputs)
        far = [
            n
            for n in order
            if n in self.inputs and (self.inputs[n][0] > self.FAR or self.inputs[n][1] > self.FAR)
        ]
        causes = [c for c in CAUSES if c in active and not active[c].silenced
                  and active[c].first_step <= steps[-1]]  # fmt: skip
        where = ""
        if far:
            where = f"; the first layer whose eval-mode input is far from its running statistics: {far[0]}"  # noqa: E501
        why = f"; explained by: {', '.join(causes)}" if causes else ""
        evidence: dict = {"mode_gap": gaps[-1], "threshold": self.GAP, "evaluations": 3}
        if far:
            evidence |= {"first_layer": far[0], "eval_mean_gap": self.inputs[far[0]][0],
                         "eval_var_gap": self.inputs[far[0]][1]}  # fmt: skip
        if causes:
            evidence["causes"] = ", ".join(causes)
        return Finding(
            steps[-1],
            far[:1],
            evidence,
            f"the model's outputs in eval mode differ from train mode by {gaps[-1]:.2f} (relative)"
            f" at three evaluations in a row, not falling{where}{why}",
        )

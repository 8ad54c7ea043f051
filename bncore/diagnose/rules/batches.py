"""Pitfalls in what BN normalizes over: batches too small to give stable statistics, a batch of
one, micro-batches under gradient accumulation, batches that are not shuffled."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import numpy as np

from bncore.diagnose.facts import RunFacts
from bncore.diagnose.findings import Diagnosis, Finding
from bncore.diagnose.rules.base import Rule
from bncore.diagnose.view import RecordsView, sustained

__all__ = ["BatchOfOne", "GradAccumulationMicroBatch", "NonIIDBatches", "SmallBatch"]

WU_HE = "Wu & He 2018, Group Normalization (Figure 1: BN's error rises below 8-16 per GPU)"
SMALL_N = 16


def _trained(rows: dict[str, np.ndarray]) -> np.ndarray:
    """The rows where the layer ran in training mode since the last log."""
    ran = np.isfinite(rows["pre_mean"]) if "pre_mean" in rows else np.ones(len(rows["step"]), bool)
    if "forwards" in rows:
        ran &= np.nan_to_num(rows["forwards"]) > 0
    return ran


class BatchOfOne(Rule):
    id = "batch-of-one"
    severity = "error"
    checks = "a training batch of one example"
    threshold = (
        "A training-mode BN forward normalizes a batch of N = 1. For (N, C) input torch "
        "raises; for (1, C, H, W) BN silently becomes instance normalization, and with H*W = 1 "
        "its output is beta: the running statistics are fed single examples. Usually the "
        "last, short batch of an epoch (drop_last=False). Fires at the first such step."
    )
    fix = (
        "DataLoader(..., drop_last=True); or skip batches smaller than 2; for batch-1 "
        "fine-tuning, keep BN in eval mode (frozen) or use GroupNorm"
    )
    references = (
        "torch.nn.functional._verify_batch_size",
        "fastai/fastai#1352",
        "meetps/pytorch-semseg#214",
        "VinAIResearch/ISBNet#12",
    )
    needs = (("layers.batch_n",), ("facts.batch",))

    def __init__(self) -> None:
        self.done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        for name, rows in view.layers.items():
            ones = rows["step"][:0]
            if "batch_n" in rows:
                ones = rows["step"][(rows["batch_n"] == 1) & _trained(rows)]
            if not len(ones) and facts.batch == 1 and facts.source == "engine":
                ones = rows["step"][:1]
            if len(ones):
                self.done = True
                yield Finding(
                    int(ones[0]), [name], {"batch_n": 1},
                    f"{name} normalized a training batch of one example at step {int(ones[0])}",
                )  # fmt: skip
                return


class SmallBatch(Rule):
    id = "small-batch"
    severity = "warning"
    checks = "the normalization batch's size"
    threshold = (
        f"A layer normalizes fewer than {SMALL_N} examples (N, per replica and per micro-"
        "batch: the median over the last 5 logged steps). BN's accuracy falls below 8-16 "
        "examples per GPU (Wu & He 2018, Figure 1), with the train/test inconsistency of "
        "noisy batch statistics. The examples count, not the values per channel (m = N x "
        "positions): at N >= 16 a layer that works at 1x1 (a ResNet's last stage on 32x32 "
        "images, any BatchNorm1d) normalizes over m = N values and trains as well as the "
        "rule of thumb says. Where data-parallel replicas "
        "normalize their own shares, ddp-without-syncbn names the cause instead; under "
        "gradient accumulation, grad-accumulation-micro-batch does."
    )
    fix = (
        "a larger batch; or GroupNorm (nn.GroupNorm(32, C)); SyncBatchNorm across devices; "
        "Batch Renormalization (BN Scope: norm.kind: renorm); FrozenBN for the last part of "
        "training (norm.freeze_after)"
    )
    references = (
        WU_HE,
        "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, section 4",
        "Ioffe 2017, Batch Renormalization",
        "ultralytics/yolov5#401",
        "fundamentalvision/BEVFormer#136",
    )
    needs = (("layers.batch_n",), ("facts.batch",))
    WINDOW = 5

    def __init__(self) -> None:
        self.recent: dict[str, deque[float]] = {}
        self.done: set[str] = set()

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if facts.world > 1 and not facts.sync_bn:
            return  # the replicas' own shares: ddp-without-syncbn
        hits: list[tuple[int, str, dict]] = []
        for name, rows in view.layers.items():
            if name in self.done:
                continue
            hit = self._check(name, rows, facts)
            if hit is not None:
                self.done.add(name)
                hits.append((hit[0], name, hit[1]))
        if hits:
            hits.sort()
            step, _, evidence = hits[0]
            layers = [n for _, n, _ in hits]
            yield Finding(
                step, layers, evidence,
                f"{layers[0]} normalizes over {evidence['batch_n']:g} examples"
                + (f" ({len(layers) - 1} more layers too)" if len(layers) > 1 else "")
                + ": its batch statistics are noisy and differ from the running ones eval "
                "mode uses",
            )  # fmt: skip

    def _check(self, name: str, rows: dict[str, np.ndarray], facts: RunFacts):
        steps = rows["step"]
        if "batch_n" not in rows:
            if facts.source == "engine" and facts.batch is not None and facts.batch < SMALL_N:
                return int(steps[0]), {"batch_n": facts.batch, "threshold": SMALL_N}
            return None
        ran = _trained(rows)
        if "forwards" in rows:
            ran &= np.nan_to_num(rows["forwards"]) <= 1  # micro-batches: the other rule's
        recent = self.recent.setdefault(name, deque(maxlen=self.WINDOW))
        for i in np.nonzero(ran)[0]:
            recent.append(float(rows["batch_n"][i]))
            n = float(np.median(recent))
            if len(recent) == self.WINDOW and n < SMALL_N:
                return int(steps[i]), {"batch_n": n, "threshold": SMALL_N}
        return None


class GradAccumulationMicroBatch(Rule):
    id = "grad-accumulation-micro-batch"
    severity = "warning"
    checks = "micro-batches under gradient accumulation"
    threshold = (
        f"More than one training forward per optimizer step (gradient accumulation) with "
        f"micro-batches of fewer than {SMALL_N} examples, for 3 logged steps in a row. BN "
        "normalizes over each micro-batch, not the accumulated batch, and moves its running "
        "statistics once per micro-batch: k micro-batches per step make the momentum "
        "1 - (1 - m)^k per optimizer step. Needs a user's records (forwards, batch_n)."
    )
    fix = (
        "larger micro-batches (fewer accumulation steps); GroupNorm; or freeze BN's "
        "statistics (eval() on the BN layers) while accumulating; torch has no accumulating BN "
        "(pytorch/pytorch#46516)"
    )
    references = (
        "pytorch/pytorch#46516",
        "ultralytics/yolov5#1630",
        "NVIDIA/DeepLearningExamples#625",
        "Deci-AI/super-gradients#1858",
    )
    needs = (("layers.forwards", "layers.batch_n"),)
    STEPS = 3

    def __init__(self) -> None:
        self.carry: dict[str, int] = {}
        self.done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        for name, rows in view.layers.items():
            if "forwards" not in rows or "batch_n" not in rows:
                continue
            k, n = np.nan_to_num(rows["forwards"]), rows["batch_n"]
            at, self.carry[name] = sustained((k > 1) & (n < SMALL_N), self.STEPS,
                                             self.carry.get(name, 0))  # fmt: skip
            if at is not None:
                self.done = True
                kk, nn_ = int(k[at]), float(n[at])
                momentum = facts.layer(name).momentum
                eff = (
                    f"; its momentum {momentum:g} acts as {1 - (1 - momentum) ** kk:.3g} per step"
                    if momentum
                    else ""
                )
                yield Finding(
                    int(rows["step"][at]), [name],
                    {"forwards_per_step": kk, "micro_batch": nn_, "threshold": SMALL_N},
                    f"{name} runs {kk} forwards of {nn_:g} examples per optimizer step: it "
                    f"normalizes over {nn_:g}, not {kk * nn_:g}{eff}",
                )  # fmt: skip
                return


class NonIIDBatches(Rule):
    id = "non-iid-batches"
    severity = "warning"
    checks = "whether consecutive batches look shuffled"
    threshold = (
        "The first BN layer's batch mean (its channel average), with its slow trend removed "
        "(a 15-step moving average), is correlated from one logged step to the next: lag-1 "
        "autocorrelation of more than 0.5 in absolute value over the last 96 logged steps. "
        "For i.i.d. batches it is about -0.07 (what the detrending leaves), within 0.4 in "
        "simulated healthy runs (sampling spread about 0.1); data sorted by "
        "class or time, or batches alternating between sources, make consecutive batches "
        "alike (or opposite). The noise is estimated from the run itself, so correlated "
        "positions within an example do not matter."
    )
    fix = (
        "DataLoader(..., shuffle=True) (or a DistributedSampler with shuffle and set_epoch); "
        "mix sources within each batch; Batch Renormalization tolerates some non-i.i.d. "
        "batches"
    )
    references = (
        "Ioffe 2017, Batch Renormalization (non-i.i.d. minibatches)",
        "happynear/NormFace#4",
        "vlfeat/matconvnet#393",
        "warpem/miss-alignment#6",
    )
    needs = (("layers.pre_mean",),)
    WINDOW, TREND, LIMIT, EVERY = 96, 15, 0.5, 16

    def __init__(self) -> None:
        self.first: str | None = None
        self.values: deque[float] = deque(maxlen=self.WINDOW)
        self.fresh = 0
        self.done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done or not view.layers:
            return
        if self.first is None:
            self.first = next(iter(view.layers))
        rows = view.layers.get(self.first)
        if rows is None:
            return
        ran = _trained(rows)
        for i in np.nonzero(ran)[0]:
            self.values.append(float(rows["pre_mean"][i]))
            self.fresh += 1
            if len(self.values) < self.WINDOW or self.fresh < self.EVERY:
                continue
            self.fresh = 0
            rho = _detrended_autocorrelation(np.asarray(self.values), self.TREND)
            if abs(rho) > self.LIMIT:
                self.done = True
                kind = "alike" if rho > 0 else "opposite"
                yield Finding(
                    int(rows["step"][i]), [self.first],
                    {"lag1_autocorrelation": rho, "threshold": self.LIMIT,
                     "steps": self.WINDOW},
                    f"consecutive batches are {kind}: {self.first}'s batch mean has a lag-1 "
                    f"autocorrelation of {rho:.2f} over the last {self.WINDOW} logged steps "
                    "(about 0 for shuffled data): the batches are not i.i.d.",
                )  # fmt: skip
                return


def _detrended_autocorrelation(x: np.ndarray, window: int) -> float:
    """Lag-1 autocorrelation of ``x`` minus its centred moving average."""
    trend = np.convolve(x, np.ones(window) / window, mode="valid")
    r = x[window // 2 : window // 2 + len(trend)] - trend
    r = r - r.mean()
    denom = float(np.dot(r, r))
    return float(np.dot(r[1:], r[:-1]) / denom) if denom > 0 else 0.0

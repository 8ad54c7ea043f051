"""Pitfalls of the running statistics eval mode normalizes with: not finite, not moving,
moving when they should be frozen, lagging the population, differing between ranks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from bncore.diagnose.facts import RunFacts
from bncore.diagnose.findings import Diagnosis, Finding
from bncore.diagnose.rules.base import Rule, warmup
from bncore.diagnose.view import RecordsView, sustained

__all__ = [
    "FrozenButUpdating",
    "NonfiniteRunningStats",
    "RankBuffersDiverge",
    "RunningStatsNotUpdating",
    "StaleRunningStats",
]

WU_JOHNSON = "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, section 3"


def _has_buffers(name: str, rows: dict[str, np.ndarray], facts: RunFacts) -> np.ndarray:
    """Rows where the layer keeps running statistics (its config says so, or they were
    finite before)."""
    tracked = facts.layer(name).track_running_stats
    finite = np.isfinite(rows["running_mean"]) & np.isfinite(rows["running_var"])
    if tracked is False:
        return np.zeros(len(finite), bool)
    if tracked:
        return np.ones(len(finite), bool)
    return np.maximum.accumulate(finite)  # once finite, it has buffers


class NonfiniteRunningStats(Rule):
    id = "nonfinite-running-stats"
    severity = "error"
    checks = "NaN or Inf in the running statistics"
    threshold = (
        "A layer's running mean or variance (any channel: the recorded channel average is "
        "then not finite) is NaN or Inf while the training loss is finite. Under mixed "
        "precision the GradScaler skips a step whose gradients overflowed, but BN has already "
        "averaged the overflowed batch into its buffers: training goes on, and only eval mode "
        "breaks, later. Fires at once, naming the layer and step."
    )
    fix = (
        "reload the BN buffers from the last good checkpoint, or reset_running_stats() and "
        "recompute them (torch.optim.swa_utils.update_bn / PreciseBN); find the layer "
        "upstream that overflows; keep BN in float32 under autocast; with float16 weights "
        "use eps >= 6.1e-5 (float16's smallest normal)"
    )
    references = (
        "pytorch/pytorch#88474",
        "pytorch/pytorch#115500",
        "pytorch/pytorch#96798",
        "traveller59/spconv#513",
    )
    needs = (("layers.running_mean", "layers.running_var", "steps.loss"),)

    def __init__(self) -> None:
        self.finite_before: dict[str, bool] = {}
        self.done: set[str] = set()

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        hits: list[tuple[int, str, dict]] = []
        for name, rows in view.layers.items():
            if name in self.done:
                continue
            tracked = _has_buffers(name, rows, facts) | self.finite_before.get(name, False)
            rm, rv = rows["running_mean"], rows["running_var"]
            bad = tracked & ~(np.isfinite(rm) & np.isfinite(rv))
            self.finite_before[name] = bool(tracked[-1]) if len(tracked) else False
            if not bad.any():
                continue
            loss = view.loss_at(rows["step"][bad])
            ok = np.isfinite(loss)
            if ok.any():
                i = np.nonzero(bad)[0][np.argmax(ok)]
                self.done.add(name)
                hits.append((int(rows["step"][i]), name,
                             {"running_mean": rm[i], "running_var": rv[i],
                              "loss": loss[np.argmax(ok)]}))  # fmt: skip
        if hits:
            hits.sort()
            step, first, evidence = hits[0]
            layers = [n for _, n, _ in hits]
            yield Finding(
                step, layers, evidence,
                f"{first}'s running statistics became non-finite at step {step} while the "
                "loss stayed finite: training goes on, but eval mode will output NaN",
            )  # fmt: skip


class RunningStatsNotUpdating(Rule):
    id = "running-stats-not-updating"
    severity = "warning"
    checks = "whether the running statistics move"
    threshold = (
        "A layer trains on batch statistics (it runs in training mode, its batch mean moves) "
        "but its running mean and variance stay bit-for-bit the same for 3 logged steps in a "
        "row, or its momentum is 0. Then eval mode normalizes with whatever the buffers held "
        "(mean 0 and variance 1 from the start). Lightning's BaseFinetuning.freeze(train_bn="
        "False) does this, by setting track_running_stats=False on layers that have buffers."
    )
    fix = (
        "keep track_running_stats=True and freeze a layer with eval() instead "
        "(m.eval() after every model.train()); momentum > 0"
    )
    references = (
        "pytorch/pytorch#156051",
        "pytorch/pytorch#20967",
        "speediedan/finetuning-scheduler#13",
        "svishwa/crowdcount-mcnn#64",
    )
    needs = (("layers.running_mean", "layers.running_var", "layers.pre_mean"),)
    STEPS = 3

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, float, float]] = {}
        self.carry: dict[str, int] = {}
        self.done: set[str] = set()

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        for name, rows in view.layers.items():
            if name in self.done or not len(rows["step"]):
                continue
            layer = facts.layer(name)
            if layer.momentum_known and layer.momentum == 0.0:
                self.done.add(name)
                yield Finding(
                    int(rows["step"][0]), [name], {"momentum": 0.0},
                    f"{name} has momentum=0: its running statistics never move, and eval "
                    "mode normalizes with mean 0 and variance 1",
                )  # fmt: skip
                continue
            rm, rv, mu = rows["running_mean"], rows["running_var"], rows["pre_mean"]
            prev = self.last.get(name)
            before = np.stack([rm, rv, mu], 1)
            before = np.concatenate([[prev if prev else (np.nan,) * 3], before[:-1]])
            still = (rm == before[:, 0]) & (rv == before[:, 1]) & np.isfinite(rm)
            moving = np.isfinite(mu) & (mu != before[:, 2])
            if "forwards" in rows:
                moving &= np.nan_to_num(rows["forwards"]) > 0
            self.last[name] = (float(rm[-1]), float(rv[-1]), float(mu[-1]))
            at, self.carry[name] = sustained(still & moving, self.STEPS, self.carry.get(name, 0))
            if at is not None:
                self.done.add(name)
                yield Finding(
                    int(rows["step"][at]), [name],
                    {"running_mean": rm[at], "running_var": rv[at], "steps_unchanged": self.STEPS},
                    f"{name} trains on batch statistics but its running statistics have not "
                    f"moved for {self.STEPS} logged steps: eval mode will use stale buffers "
                    "(track_running_stats switched off on a layer that has them?)",
                )  # fmt: skip


class FrozenButUpdating(Rule):
    id = "frozen-but-updating"
    severity = "warning"
    checks = "frozen BN layers whose statistics still move"
    threshold = (
        "A layer's gamma and beta get no gradient (requires_grad=False: the recorded gradient "
        "norm is missing) for 3 logged steps in a row, but its running statistics keep "
        "moving: the 'frozen' backbone is in train mode, and the fine-tuning data overwrite "
        "the statistics it was trained with."
    )
    fix = (
        "put the frozen BN layers in eval mode after every model.train(): "
        "for m in backbone.modules(): isinstance(m, nn.modules.batchnorm._BatchNorm) and "
        "m.eval(); or torchvision's FrozenBatchNorm2d / timm's freeze_batch_norm_2d; or train "
        "BN on purpose (Frankle et al. 2021)"
    )
    references = (
        "pytorch/pytorch#86590",
        "Frankle, Schwab, Morcos 2021, Training BatchNorm and Only BatchNorm",
        "chemprop/chemprop#952",
        "pytorch/vision#2079",
    )
    needs = (("layers.gamma_grad_norm", "layers.running_mean"),)
    STEPS = 3

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.carry: dict[str, int] = {}
        self.done: set[str] = set()

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        hits: list[tuple[int, str]] = []
        for name, rows in view.layers.items():
            if name in self.done or facts.layer(name).affine is False:
                continue
            rm, g = rows["running_mean"], rows["gamma_grad_norm"]
            if "gamma" in rows and not np.isfinite(rows["gamma"]).any():
                continue  # no gamma at all (affine=False)
            prev = np.concatenate([[self.last.get(name, np.nan)], rm[:-1]])
            self.last[name] = float(rm[-1]) if len(rm) else np.nan
            frozen = np.isnan(g)  # no .grad at all (a zero one: a dead layer, not a frozen one)
            moving = np.isfinite(rm) & np.isfinite(prev) & (rm != prev)
            at, self.carry[name] = sustained(frozen & moving, self.STEPS, self.carry.get(name, 0))
            if at is not None:
                self.done.add(name)
                hits.append((int(rows["step"][at]), name))
        if hits:
            hits.sort()
            layers = [n for _, n in hits]
            yield Finding(
                hits[0][0], layers, {"gamma_grad_norm": 0.0, "steps": self.STEPS},
                f"{layers[0]}"
                + (f" and {len(layers) - 1} more layers" if len(layers) > 1 else "")
                + " get no gradient (frozen) but their running statistics keep moving with "
                "the new data: the frozen layers are in train mode",
            )  # fmt: skip


class StaleRunningStats(Rule):
    id = "stale-running-stats"
    severity = "warning"
    checks = "whether the running statistics keep up with the network"
    threshold = (
        "After the EMA's warm-up (3 / momentum steps, at most 300 and a quarter of the run): "
        "(a) where PreciseBN recomputes the population statistics (BN Scope's precise_bn), "
        "the EMA's mean is more than 0.25 population standard deviations from the "
        "population's (RMS over channels) at two evaluations in a row; or (b) the running "
        "statistics lag the batches systematically: over 16 logged steps, the gap between "
        "the running and the batch mean (channel averages, in the batch's standard "
        "deviations) is at least 0.25 on average, or the running variance is off from the "
        "batch's by a factor of 1.5 on average, and that average is more than 2.5 times the "
        "gap's own step-to-step standard deviation, in two such windows in a row. A healthy "
        "EMA's gap is noise around zero; its spread, measured from the run itself, is the "
        "yardstick, so correlated positions within an example do not matter."
    )
    fix = (
        "recompute the statistics before evaluating or saving: PreciseBN (fvcore's "
        "update_bn_stats, torch.optim.swa_utils.update_bn(loader, model), BN Scope's "
        "precise_bn: K); or a larger momentum; FrozenBN for the last epochs"
    )
    references = (
        WU_JOHNSON,
        "pytorch/pytorch#4741",
        "layumi/Person_reID_baseline_pytorch#218",
        "tensorflow/tensorflow#44371",
    )
    needs = (("layer_evals.ema_mean_gap",), ("layers.running_mean", "layers.pre_mean"))
    EMA_GAP, EFFECT, WINDOW = 0.25, 2.5, 16
    MEAN_LAG, VAR_LAG = 0.25, float(np.log(1.5))

    def __init__(self) -> None:
        self.gaps: dict[str, np.ndarray] = {}  # each layer's last gaps, for the next window
        self.ema_above: dict[str, int] = {}
        self.windows_above: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self.done = False

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        found = self._population(view, facts) or self._lag(view, facts)
        if found is not None:
            self.done = True
            yield found

    def _population(self, view: RecordsView, facts: RunFacts) -> Finding | None:
        for name, rows in view.layer_evals.items():
            if "ema_mean_gap" not in rows:
                continue
            start = self.start.setdefault(name, int(rows["step"][0]))
            ready = rows["step"] - start >= warmup(facts.layer(name), facts)
            above = ready & (rows["ema_mean_gap"] > self.EMA_GAP)
            at, self.ema_above[name] = sustained(above, 2, self.ema_above.get(name, 0))
            if at is not None:
                gap = float(rows["ema_mean_gap"][at])
                return Finding(
                    int(rows["step"][at]), [name],
                    {"ema_mean_gap": gap, "threshold": self.EMA_GAP,
                     "momentum": facts.layer(name).momentum},
                    f"{name}'s running mean is {gap:.2f} standard deviations from the "
                    "population's (PreciseBN) at two evaluations in a row: eval mode "
                    "normalizes with statistics of an older network",
                )  # fmt: skip
        return None

    def _lag(self, view: RecordsView, facts: RunFacts) -> Finding | None:
        for name, rows in view.layers.items():
            if "running_mean" not in rows or "pre_mean" not in rows:
                continue
            start = self.start.setdefault(name, int(rows["step"][0]))
            with np.errstate(divide="ignore", invalid="ignore"):
                # the gaps in the batch's standard deviations, and as a log ratio
                gaps = np.stack([
                    (rows["running_mean"] - rows["pre_mean"]) / np.sqrt(rows["pre_var"]),
                    np.log(rows["running_var"] / rows["pre_var"]),
                ], 1)  # fmt: skip
            keep = rows["step"] - start >= warmup(facts.layer(name), facts)
            keep &= np.isfinite(gaps).all(1)
            steps, gaps = rows["step"][keep], gaps[keep]
            if not len(gaps):
                continue
            # sliding windows over what came before too: every window ending at a new gap
            before = self.gaps.get(name, np.empty((0, 2)))
            series = np.concatenate([before, gaps])
            self.gaps[name] = series[-(self.WINDOW - 1) :]
            effect = _effects(series, self.WINDOW, (self.MEAN_LAG, self.VAR_LAG))[-len(gaps) :]
            # above at every step of a second window after the first
            at, self.windows_above[name] = sustained(effect > self.EFFECT, self.WINDOW + 1,
                                                     self.windows_above.get(name, 0))  # fmt: skip
            if at is not None:
                e = float(effect[at])
                return Finding(
                    int(steps[at]), [name],
                    {"lag_effect": e, "threshold": self.EFFECT, "window_steps": self.WINDOW,
                     "momentum": facts.layer(name).momentum},
                    f"{name}'s running statistics lag its batches systematically (the gap's "
                    f"mean is {e:.1f}x its spread over {self.WINDOW} logged steps): eval mode "
                    "normalizes with statistics of an older network",
                )  # fmt: skip
        return None


def _effects(series: np.ndarray, window: int, least: tuple[float, float]) -> np.ndarray:
    """For each window of ``window`` rows of ``series`` (rows, 2) ending at a row (NaN before
    the first full one): the larger of |mean| / sd over the two gap series (the mean's gap in
    standard deviations, the variance's log ratio), counting only a series whose mean gap is
    at least ``least`` (a lag too small to matter to eval mode is not one)."""
    n = len(series)
    out = np.full(n, np.nan)
    if n < window:
        return out
    x = series.astype(np.float64)
    c1 = np.concatenate([np.zeros((1, 2)), np.cumsum(x, 0)])
    c2 = np.concatenate([np.zeros((1, 2)), np.cumsum(x * x, 0)])
    s1, s2 = c1[window:] - c1[:-window], c2[window:] - c2[:-window]
    mean = s1 / window
    var = np.maximum(s2 - s1 * mean, 0.0) / (window - 1)
    sd = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = np.where((sd > 0) & (np.abs(mean) >= np.asarray(least)), np.abs(mean) / sd, 0.0)
    out[window - 1 :] = effect.max(1)
    return out


class RankBuffersDiverge(Rule):
    id = "rank-buffers-diverge"
    severity = "warning"
    checks = "whether data-parallel ranks keep the same running statistics"
    threshold = (
        "Under data parallelism each rank keeps its own BN buffers; only rank 0's are "
        "saved. Fires when a rank's running mean differs from rank 0's by more than 0.05 of "
        "rank 0's running standard deviation, or its running variance by more than 10%, "
        "(channel averages, recorded by each rank of a user's script as rank{k}.<layer>) at "
        "3 logged steps. DistributedDataParallel broadcasts rank 0's buffers at every forward "
        "unless broadcast_buffers=False."
    )
    fix = (
        "keep DistributedDataParallel(..., broadcast_buffers=True), use SyncBatchNorm, or "
        "average the buffers before saving or evaluating (timm's distribute_bn, --dist-bn "
        "reduce)"
    )
    references = ("pytorch/pytorch#2584", "timm.utils.distribute_bn", WU_JOHNSON)
    needs = (("layers.running_mean", "facts.world"),)
    STEPS = 3

    def __init__(self) -> None:
        self.zero: dict[str, dict[int, tuple[float, float]]] = {}
        self.others: dict[str, dict[int, tuple[float, float]]] = {}
        self.count: dict[str, int] = {}
        self.done = False

    def missing(self, columns: set[str], facts: RunFacts) -> str | None:
        if facts.world <= 1:
            return "the run is not data-parallel"
        return super().missing(columns, facts)

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done:
            return
        for name, rows in view.layers.items():
            rank0 = not name.startswith("rank")
            store = self.zero if rank0 else self.others
            at = store.setdefault(name, {})
            values = zip(rows["step"], rows["running_mean"], rows["running_var"], strict=True)
            at.update((int(s), (float(m), float(v))) for s, m, v in values)
        try:
            yield from self._compare(facts)
        finally:  # ranks post apart: keep the latest steps of each to pair with the other's
            for store in (self.zero, self.others):
                for at in store.values():
                    for step in sorted(at)[:-64]:
                        del at[step]

    def _compare(self, facts: RunFacts) -> Iterable[Finding]:
        for other, values in self.others.items():
            base = other.split(".", 1)[1]
            zero = self.zero.get(base, {})
            for step in sorted(set(values) & set(zero)):
                (m, v), (m0, v0) = values.pop(step), zero[step]
                eps = facts.layer(base).eps or 1e-5
                dm, dv = abs(m - m0) / np.sqrt(v0 + eps), abs(v / v0 - 1) if v0 > 0 else 0.0
                if dm > 0.05 or dv > 0.1:
                    self.count[other] = self.count.get(other, 0) + 1
                    if self.count[other] >= self.STEPS:
                        self.done = True
                        yield Finding(
                            step, [base, other],
                            {"mean_difference_in_std": dm, "variance_ratio_minus_1": dv,
                             "threshold_mean": 0.05, "threshold_var": 0.1},
                            f"{other}'s running statistics differ from rank 0's {base} "
                            f"({dm:.2f} std in the mean): the ranks evaluate differently, and "
                            "only rank 0's buffers are saved",
                        )  # fmt: skip
                        return

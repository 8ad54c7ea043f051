"""Pitfalls in how BN is set up: read from the run's configuration and structure, confirmed by
the first records (a layer is named once it has run)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from bncore.diagnose.facts import RunFacts
from bncore.diagnose.findings import Diagnosis, Finding
from bncore.diagnose.rules.base import Rule
from bncore.diagnose.view import RecordsView

__all__ = [
    "BNBeforeOutput",
    "CumulativeMomentumInTraining",
    "DDPWithoutSyncBN",
    "DropoutBeforeBN",
    "MomentumConvention",
]

KERAS = "https://keras.io/api/layers/normalization_layers/batch_normalization/"
TORCH_BN = "https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html"


class _OncePerLayer(Rule):
    """Fires for each layer its facts condemn, at the first logged step it is seen."""

    def __init__(self) -> None:
        self.done: set[str] = set()

    def condemns(self, name: str, facts: RunFacts) -> dict | None:
        """The evidence against ``name``, or None."""
        raise NotImplementedError

    def message(self, layers: list[str], evidence: dict) -> str:
        raise NotImplementedError

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        found: dict[int, list[tuple[str, dict]]] = {}
        for name, rows in view.layers.items():
            if name in self.done or not len(rows.get("step", [])):
                continue
            self.done.add(name)
            evidence = self.condemns(name, facts)
            if evidence is not None:
                found.setdefault(int(rows["step"][0]), []).append((name, evidence))
        for step, hits in sorted(found.items()):
            layers = [n for n, _ in hits]
            yield Finding(step, layers, hits[0][1], self.message(layers, hits[0][1]))


def _count(layers: list[str]) -> str:
    return layers[0] if len(layers) == 1 else f"{layers[0]} and {len(layers) - 1} more layers"


class MomentumConvention(_OncePerLayer):
    id = "momentum-convention"
    severity = "warning"
    checks = "momentum in PyTorch's convention"
    threshold = (
        "A layer's momentum in PyTorch's convention is 0.5 or more. PyTorch's momentum is the "
        "weight of the new batch (running = (1 - m) running + m batch); Keras' and "
        "TensorFlow's is the weight of the old value, so their usual 0.9-0.999 given to torch "
        "makes the running statistics follow the last batch almost alone, and eval mode "
        "normalizes with one noisy batch. Read from the layer's configuration."
    )
    fix = (
        "momentum = 1 - keras_momentum: nn.BatchNorm2d(C, momentum=0.01) for Keras' 0.99 "
        "(bncore.keras_momentum_to_torch(0.99)); keep eps=1e-3 if the model came from Keras"
    )
    references = (TORCH_BN, KERAS, "pytorch/examples#289", "kazuto1011/deeplab-pytorch#79")
    needs = (("facts.layers",),)

    def missing(self, columns: set[str], facts: RunFacts) -> str | None:
        if not any(layer.momentum_known for layer in facts.layers.values()):
            return "needs each layer's momentum (the watcher's layer_config, or the run config)"
        return super().missing(columns, facts)

    def condemns(self, name: str, facts: RunFacts) -> dict | None:
        layer = facts.layer(name)
        if layer.momentum_known and layer.momentum is not None and layer.momentum >= 0.5:
            return {"momentum": layer.momentum, "threshold": 0.5}
        return None

    def message(self, layers: list[str], evidence: dict) -> str:
        m = evidence["momentum"]
        return (
            f"{_count(layers)} has momentum={m:g} in PyTorch's convention: each batch moves the "
            f"running statistics {m:.0%} of the way, as a Keras/TensorFlow decay of {1 - m:g} "
            "would; a Keras momentum of 0.99 is 0.01 here"
        )


class CumulativeMomentumInTraining(Rule):
    id = "cumulative-momentum-in-training"
    severity = "warning"
    checks = "momentum=None (cumulative average) while training"
    threshold = (
        "A layer with momentum=None keeps training for more than 50 logged steps. None makes "
        "the running statistics the plain average of every batch since the last reset, so "
        "they are dominated by the early network and fall ever further behind the weights; "
        "it exists for recalibrating after training (torch's PR #5766). Read from the "
        "layer's configuration."
    )
    fix = (
        "train with a momentum (0.1); for population statistics afterwards: "
        "model.apply(lambda m: m.reset_running_stats() if isinstance(m, nn.BatchNorm2d) else "
        "None), set momentum=None, run ~1000 training batches under torch.no_grad() in train "
        "mode, then eval() (or torch.optim.swa_utils.update_bn / fvcore's update_bn_stats)"
    )
    references = ("pytorch/pytorch#5766", "pytorch/pytorch#31498", TORCH_BN)
    needs = (("facts.layers",),)
    STEPS = 50

    def __init__(self) -> None:
        self.first: dict[str, int] = {}
        self.done: set[str] = set()

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        hits: list[str] = []
        step = None
        for name, rows in view.layers.items():
            layer = facts.layer(name)
            if name in self.done or not (layer.momentum_known and layer.momentum is None):
                continue
            steps = rows["step"]
            start = self.first.setdefault(name, int(steps[0]))
            late = steps[steps - start >= self.STEPS]
            if len(late):
                self.done.add(name)
                hits.append(name)
                step = int(late[0]) if step is None else min(step, int(late[0]))
        if hits and step is not None:
            yield Finding(
                step, hits, {"momentum": "None", "steps_averaged": self.STEPS},
                f"{_count(hits)} trains with momentum=None: its running statistics are the "
                "average of every batch since the start, weighted towards a network that no "
                "longer exists, and eval mode normalizes with them",
            )  # fmt: skip


class DropoutBeforeBN(_OncePerLayer):
    id = "dropout-before-bn"
    severity = "warning"
    checks = "a Dropout between a weighted layer and BN"
    threshold = (
        "A Dropout module runs between the Linear/Conv that feeds a BN layer and the BN layer "
        "(found on the first training forward). Inverted dropout of rate p multiplies the "
        "variance BN sees in training by at least 1/(1-p) compared with eval mode, so the "
        "running variance is too large at test time: the 'variance shift' of Li et al. 2019. "
        "Structural: it fires as soon as the structure is seen."
    )
    fix = (
        "move Dropout after the last BN (just before the classifier), or lower p; recompute "
        "BN's statistics with dropout off (PreciseBN) before evaluating"
    )
    references = (
        "Li, Chen, Hu, Yang 2019, Understanding the Disharmony between Dropout and Batch "
        "Normalization by Variance Shift (CVPR)",
        "luigibonati/mlcolvar#205",
        "keras-team/keras#8542",
    )
    needs = (("facts.structure_known",),)

    def condemns(self, name: str, facts: RunFacts) -> dict | None:
        p = facts.layer(name).dropout_before
        if p:
            return {"dropout_p": p, "variance_shift_at_least": 1 / (1 - p) if p < 1 else "inf"}
        return None

    def message(self, layers: list[str], evidence: dict) -> str:
        p = evidence["dropout_p"]
        return (
            f"a Dropout (p={p:g}) runs just before {_count(layers)}: in training BN sees a "
            f"variance at least {1 / (1 - p):.2g}x the one it will see in eval mode, and its "
            "running variance is wrong at test time"
        )


class BNBeforeOutput(_OncePerLayer):
    id = "bn-before-output"
    severity = "info"
    checks = "a BN layer right before the output"
    threshold = (
        "The last BN layer in execution order has no Linear/Conv after it before the model's "
        "output (found on the first training forward): the logits are batch-normalized, so "
        "their scale is fixed by gamma and they depend on the batch, and the train/eval gap "
        "lands on the output directly. Sometimes intended (BNNeck, binary networks)."
    )
    fix = "remove that BN, or replace it by a learned temperature; silence this if intended"
    references = ("yaoing/DAN#14", "team-approx-bayes/BayesBiNN#1", "jolibrain/joliGEN#41")
    needs = (("facts.structure_known",),)

    def condemns(self, name: str, facts: RunFacts) -> dict | None:
        return {"layer": name} if name == facts.output_layer else None

    def message(self, layers: list[str], evidence: dict) -> str:
        return f"{layers[0]} normalizes the model's output: its logits depend on the batch"


class DDPWithoutSyncBN(Rule):
    id = "ddp-without-syncbn"
    severity = "warning"
    checks = "data parallelism without synchronized BN at a small per-replica batch"
    threshold = (
        "Several replicas train (DistributedDataParallel), BN is not synchronized, and each "
        "replica normalizes fewer than 16 examples: what BN's accuracy depends on is the "
        "per-replica batch, not the global one (Wu & He 2018; Wu & Johnson 2021); ultralytics "
        "reports it 'noticeable when per-GPU batch <= 8'. From the run's config (replicas, "
        "sync_bn, batch size) or a script's world size and batch_n."
    )
    fix = (
        "model = nn.SyncBatchNorm.convert_sync_batchnorm(model) before DDP (Lightning: "
        "Trainer(sync_batchnorm=True); timm: --sync-bn; BN Scope: distributed.sync_bn: true), "
        "or a larger per-replica batch, or GroupNorm"
    )
    references = (
        "Wu & He 2018, Group Normalization",
        "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm",
        "pytorch/pytorch#2584",
        "ultralytics/yolov5#401",
    )
    needs = (("facts.world",),)
    SMALL = 16

    def __init__(self) -> None:
        self.done = False

    def missing(self, columns: set[str], facts: RunFacts) -> str | None:
        if facts.world <= 1:
            return "the run is not data-parallel"
        if facts.sync_bn is None and facts.batch is None and "layers.batch_n" not in columns:
            return "needs the per-replica batch size and whether BN is synchronized"
        return super().missing(columns, facts)

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        if self.done or facts.sync_bn or facts.world <= 1 or not view.layers:
            return
        for rows in view.layers.values():
            n = facts.batch
            if "batch_n" in rows:
                ok = np.isfinite(rows["batch_n"])
                if not ok.any():
                    continue
                n = int(np.median(rows["batch_n"][ok]))
            if n is not None and n < self.SMALL:
                self.done = True
                yield Finding(
                    int(rows["step"][0]), list(view.layers),
                    {"replicas": facts.world, "per_replica_batch": n,
                     "global_batch": n * facts.world, "threshold": self.SMALL},
                    f"{facts.world} replicas each normalize their own {n} examples: BN's "
                    f"statistics come from {n}, not from the global batch of "
                    f"{n * facts.world}",
                )  # fmt: skip
                return

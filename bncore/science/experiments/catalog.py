"""The experiments: the BN literature's findings, each one sweep of runs away, with the check
that says whether this measurement agrees (bncore.science.experiments.verdicts).

Default ("quick") sizes finish in minutes on a 2-core CPU; ``full`` holds the overrides for a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from bncore.run.config import DataConfig, DatasetName, get_field
from bncore.run.data import load_dataset
from bncore.science.experiments import verdicts
from bncore.science.experiments.framework import Experiment, Panel, Provoked
from bncore.science.theory import gradient_explosion_rate

__all__ = ["EXPERIMENTS"]


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
_GROWTH = Panel("Squared-gradient growth per layer, measured and in theory", "by_value",
                ("grad_in_norm",), "growth per layer", x="batch_size", log_x=True,
                reduce="growth", theory=_yang, theory_label="Yang et al. mean field")  # fmt: skip
#: A small CIFAR-style ResNet on MNIST-1D (1-D convolutions): 98% in a few hundred steps.
_RESNET = {"kind": "resnet", "depth": 1, "width": 16}
ROUNDS = 3  # epochs of the frozen-BN experiment


def _frozen_epochs(point: dict[str, Any]) -> dict[str, Any]:
    """Equal epochs at every batch size, the learning rate linear in it, eight evaluations, and
    PreciseBN over about 1000 examples (Wu & Johnson: 10^3-10^4 suffice)."""
    bs = point["batch_size"]
    steps = math.ceil(ROUNDS * _train_size("mnist1d") / bs)
    return {"steps": steps, "optim.lr": 0.1 * bs / 32, "eval_interval": max(1, steps // 8),
            "stats_interval": max(1, steps // 400), "precise_bn": math.ceil(1024 / bs)}  # fmt: skip


EXPERIMENTS: dict[str, Experiment] = {
    e.key: e
    for e in (
        Experiment(
            key="bn-vs-learning-rate",
            verdict=verdicts.CHECKS["bn-vs-learning-rate"],
            title="BN vs no BN across learning rates",
            claim="With BN a network trains over a much wider range of learning rates and "
            "reaches a given accuracy in fewer steps (Ioffe & Szegedy 2015; Santurkar et al. "
            "2018; Bjorck et al. 2018).",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 800,
                  "eval_interval": 50, "stats_interval": 10},
            grid={"optim.lr": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                  "norm.kind": ["batch", "none"], "seed": [0, 1, 2]},
            panels=(
                Panel("Best test accuracy by learning rate", "by_value", ("test_acc",),
                      "best test accuracy", x="optim.lr", log_x=True, reduce="best"),
                Panel("Steps to 50% test accuracy (missing: never reached)", "by_value",
                      ("test_acc",), "steps", x="optim.lr", log_x=True, reduce="steps_to",
                      target=0.5),
            ),
            full={"steps": 10_000, "model.width": 512, "model.depth": 8},
            note="Three seeds: a learning rate is usable where the best test accuracy comes "
            "within 10 points of the seed's best run; BN must be usable at more learning rates "
            "on every seed, by more than half a grid step on average and 2 standard errors. "
            "The steps to 50% are shown, not tested.",
        ),
        Experiment(
            key="ioffe-szegedy-figure-1",
            verdict=verdicts.CHECKS["ioffe-szegedy-figure-1"],
            title="Ioffe & Szegedy 2015, Figure 1",
            claim="A 3 x 100 sigmoid network trains faster and higher with BN, and the "
            "distribution of a last-layer sigmoid input (its 15/50/85th percentiles) stays "
            "stable with BN while it drifts without (Ioffe & Szegedy 2015, Figure 1).",
            base={"model": {"kind": "mlp", "depth": 3, "width": 100, "activation": "sigmoid"},
                  "data": {"name": "mnist1d"}, "batch_size": 60, "steps": 3000,
                  "eval_interval": 100, "stats_interval": 10,
                  "optim": {"lr": 0.5, "momentum": 0.0}},  # the paper's plain SGD
            grid={"norm.kind": ["batch", "none"], "seed": [0, 1, 2]},
            panels=(
                _TEST_ACC,
                Panel("Last layer, tracked unit 0: 15/50/85th percentiles of its sigmoid input",
                      "over_steps", ("p15_0", "p50_0", "p85_0"), "sigmoid input", layer="last"),
            ),
            full={"steps": 50_000},
            note="The paper trains on MNIST for 50k steps with plain SGD (with momentum 0.9, "
            "BN's tracked input drifts too: its median ends at -2.9 against -0.5 with plain "
            "SGD); this uses MNIST-1D (made offline), three seeds: BN must train higher by 2 "
            "points and keep its input at least twice as stable, beyond the seeds' spread and "
            "on every seed. "
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
            panels=(_GROWTH,),
            verdict=verdicts.gradient_explosion(_GROWTH),
            full={"model.depth": 40, "model.width": 1024, "data.features": 1024},
            note="Measured over 10 steps at a learning rate of 1e-9 (the weights stay at their "
            "initialization). The ReLU line is the paper's finite-B mean field rate "
            "(bncore.science.theory.mean_field_rate), not its large-batch limit.",
        ),
        Experiment(
            key="batch-size-bn-vs-groupnorm",
            verdict=verdicts.CHECKS["batch-size-bn-vs-groupnorm"],
            title="Batch size: BN against GroupNorm",
            claim="BN's accuracy falls sharply as the batch shrinks below about 8 examples, "
            "because its statistics get noisy and differ from the running ones used at test "
            "time; GroupNorm does not depend on the batch and stays flat (Wu & He 2018, "
            "Figure 1).",
            base={"model": {"kind": "mlp", "depth": 3, "width": 64}, "data": {"name": "digits"},
                  "eval_interval": 100, "stats_interval": 10},
            grid={"batch_size": [2, 4, 8, 16, 32, 64, 128], "norm.kind": ["batch", "group"],
                  "seed": [0, 1, 2]},
            derive=_same_epochs,
            panels=(
                Panel("Final test accuracy by batch size", "by_value", ("test_acc",),
                      "test accuracy", x="batch_size", log_x=True, reduce="final"),
                Panel("Train/eval-mode gap by batch size", "by_value", ("mode_gap",),
                      "relative logit gap", x="batch_size", log_x=True, reduce="final"),
            ),
            provokes=tuple(
                Provoked("small-batch", {"batch_size": b, "norm.kind": "batch"},
                         {"batch_size": 128, "norm.kind": "batch"})
                for b in (2, 4, 8)
            ),
            full={"model.width": 256},
            note=f"As in the paper, every batch size trains for the same epochs ({EPOCHS} of "
            "digits' 1438 training examples) with the learning rate scaled with the batch "
            "(0.1 x B / 32). An MLP: each channel's batch statistics come from B values only "
            "(a CNN on 8x8 images pools 64 positions per example and hides the effect). Three "
            "seeds: BN's final accuracy at the smallest batch must fall 10 points under its "
            "best, and 5 points more than GroupNorm's, beyond 2 standard errors, on every seed.",
        ),
        Experiment(
            key="placement",
            verdict=verdicts.CHECKS["placement"],
            title="BN before or after the activation",
            claim="Ioffe & Szegedy put BN before the nonlinearity; in practice placing it after "
            "trains about as well, and the bias of the layer before BN is useless, since BN "
            "subtracts it again (its gradient is zero).",
            base={"model": {**_MLP, "bias": True}, "data": {"name": "mnist1d"},
                  "batch_size": 64, "steps": 1000, "eval_interval": 50, "stats_interval": 10,
                  "optim": {"lr": 0.1}},
            grid={"norm.placement": ["before_activation", "after_activation"],
                  "seed": [0, 1, 2]},
            panels=(
                _TEST_ACC,
                Panel("Gradient norm of the last layer's own bias (zero when BN follows it)",
                      "over_steps", ("layer_bias_grad_norm",), "bias gradient norm",
                      layer="last"),
                Panel("Share of dead ReLUs, last layer", "over_steps", ("act_dead",),
                      "dead units", layer="last"),
            ),
            full={"steps": 10_000},
            note="Every layer keeps its bias here (model.bias), so that its gradient shows. "
            "Three seeds: 'about as well' is a difference of final test accuracy within 5 "
            "points either way, 2 standard errors included, on every seed; the bias before BN "
            "must get a gradient 10^4 times smaller than after it.",
        ),
        Experiment(
            key="running-statistics",
            verdict=verdicts.CHECKS["running-statistics"],
            title="Running statistics: momentum and the train/eval gap",
            claim="Evaluation uses running averages of the batch statistics; a small momentum "
            "averages over many batches and lags behind while the weights move, which shows as "
            "a gap between train-mode and eval-mode outputs. PyTorch's momentum 0.1 is Keras' "
            "0.9 (the weight of the old value).",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 1000,
                  "eval_interval": 50, "stats_interval": 10, "optim": {"lr": 0.1},
                  "eval_gaps": True},
            grid={"norm.momentum": [0.001, 0.01, 0.1, 0.5], "seed": [0, 1, 2]},
            panels=(
                Panel("Train/eval-mode gap over training", "over_steps", ("mode_gap",),
                      "relative logit gap"),
                Panel("Final test accuracy by momentum", "by_value", ("test_acc",),
                      "test accuracy", x="norm.momentum", log_x=True, reduce="final"),
            ),
            provokes=(
                Provoked("stale-running-stats", {"norm.momentum": 0.001}, {"norm.momentum": 0.1}),
            ),
            full={"steps": 10_000},
            note="Three seeds: the train/eval gap at the smallest momentum must be the "
            "largest, and 1.5 times the largest momentum's, beyond 2 standard errors, on every "
            "seed. The accuracies are shown, not tested: the claim is about the lag.",
        ),
        Experiment(
            key="pytorch-vs-keras",
            verdict=verdicts.CHECKS["pytorch-vs-keras"],
            title="Running statistics: PyTorch's and Keras' defaults",
            claim="The same word means opposite things: PyTorch's momentum 0.1 weighs the new "
            "batch, Keras' 0.99 the old average, so by default Keras' running statistics "
            "average over about ten times more batches (and it adds eps 1e-3, not 1e-5, and "
            "feeds the biased variance); early in training its eval-mode outputs lag further "
            "behind.",
            base={"model": _MLP, "data": {"name": "mnist1d"}, "batch_size": 64, "steps": 600,
                  "eval_interval": 25, "stats_interval": 10, "optim": {"lr": 0.1},
                  "eval_gaps": True},
            grid={"norm.convention": ["pytorch", "keras"], "seed": [0, 1, 2]},
            panels=(
                Panel("Train/eval-mode gap over training", "over_steps", ("mode_gap",),
                      "relative logit gap"),
                Panel("Running mean against the batch mean (RMS gap), last layer", "over_steps",
                      ("running_mean_gap",), "RMS gap", layer="last"),
                _TEST_ACC,
            ),
            provokes=(
                Provoked("train-eval-gap", {"norm.convention": "keras"},
                         {"norm.convention": "pytorch"}),
            ),
            full={"steps": 10_000},
            note="Three seeds: over the first third of training the gap with Keras' defaults "
            "must be 1.25 times PyTorch's at least, beyond 2 standard errors, on every seed.",
        ),
        Experiment(
            key="noisy-bn",
            verdict=verdicts.CHECKS["noisy-bn"],
            title="Noisy BN: injected covariate shift (Santurkar et al. 2018)",
            claim="Adding a random, step-to-step shift and scale after each BN layer (internal "
            "covariate shift on purpose) barely hurts: noisy BN trains about as well as BN and "
            "better than no BN, so reducing covariate shift is not what makes BN work "
            "(Santurkar et al. 2018, Figure 2).",
            base={"model": {**_MLP, "depth": 8}, "data": {"name": "mnist1d"},
                  "batch_size": 64, "steps": 1000, "eval_interval": 50, "stats_interval": 10,
                  "ics_interval": 20, "optim": {"lr": 0.1},
                  "norm": {"noise_shift": 0.1, "noise_scale": 1.1}},
            grid={"norm.kind": ["batch", "noisy", "none"], "seed": [0, 1, 2]},
            # noise of 10% of BN's unit scale: noise_shift 0.25 / noise_scale 1.25 already cost
            # 9 points of accuracy here (0.56 against 0.66)
            panels=(
                _TEST_ACC,
                Panel("Internal covariate shift of the last block, ||G - G'||", "over_steps",
                      ("ics",), "ICS", layer="last"),
                Panel("cos(G, G') of the last block: 1 is no shift", "over_steps",
                      ("ics_cos",), "cosine", layer="last"),
            ),
            full={"steps": 10_000, "model.depth": 16},
            note="Depth 8, three seeds: at depth 4 BN itself gains almost nothing over no BN "
            "here (0.668 against 0.655), so noisy BN cannot beat no BN by much. Noisy BN must "
            "beat no BN by 2 points, and stay within 3 points of BN either way (2 standard "
            "errors included), on every seed. "
            "ICS as Santurkar et al. define it: the change of a block's weight gradient on "
            "the same batch once the blocks below took their step (bncore.run.landscape).",
        ),
        Experiment(
            key="landscape",
            verdict=verdicts.CHECKS["landscape"],
            title="Landscape smoothness with and without BN (Santurkar et al. 2018)",
            claim="With BN the loss changes less, and the gradient stays more predictive, along "
            "the gradient direction: the landscape is smoother (a smaller effective "
            "beta-smoothness), which lets larger steps work (Santurkar et al. 2018, Figure 4).",
            base={"model": {**_MLP, "depth": 8}, "data": {"name": "mnist1d"},
                  "batch_size": 64, "steps": 1000, "eval_interval": 50, "stats_interval": 10,
                  "landscape": True, "optim": {"lr": 0.1}},
            grid={"norm.kind": ["batch", "none"], "seed": [0, 1, 2]},
            panels=(
                Panel("Loss landscape: range of the loss along the gradient (0.5-4 lr)",
                      "over_steps", ("landscape_loss_range",), "max - min loss"),
                Panel("Gradient predictiveness: largest ||g(w - eta g) - g(w)||", "over_steps",
                      ("grad_change",), "gradient change"),
                Panel("Effective beta-smoothness", "over_steps", ("beta_smoothness",),
                      "max ||dg|| / ||eta g||"),
            ),
            full={"steps": 10_000, "model.depth": 16},
            note="Steps of 0.5-4 learning rates along the gradient, as the paper's 0.05-0.4 at "
            "lr 0.1; three seeds. Depth 8: at depth 4 the unnormalized network takes these "
            "steps without overshooting, so the loss range mostly measures how far a step "
            "descends, which is further with BN (0.31 against 0.22, BN larger on 3 of 3 seeds), "
            "while gradient change and beta-smoothness still favour BN; the paper's VGG without "
            "BN overshoots, as this depth-8 network does once it learns; but as medians over "
            "the evaluations, at quick size, BN's loss range does not come out smaller on every "
            "seed, while the other two measures do (the results table in docs/experiments.md "
            "gives the numbers of one run). While a "
            "network sits on its initial plateau its landscape is flat: the verdict leaves those "
            "evaluations out.",
        ),
        Experiment(
            key="ema-vs-precise-bn",
            verdict=verdicts.CHECKS["ema-vs-precise-bn"],
            title="EMA against PreciseBN population statistics (Wu & Johnson 2021)",
            claim="The EMA of batch statistics that BN keeps for evaluation lags behind the "
            "model while it trains, most with a large batch or a small momentum, and evaluation "
            "with it is less accurate and unstable; PreciseBN's population statistics, "
            "recomputed from 10^3-10^4 examples with the model frozen, give the accuracy back "
            "(Wu & Johnson 2021, section 3).",
            base={"model": _RESNET, "data": {"name": "mnist1d"}, "batch_size": 256,
                  "steps": 400, "eval_interval": 40, "stats_interval": 10, "precise_bn": 8,
                  "optim": {"lr": 0.2}},
            grid={"norm.momentum": [0.003, 0.3], "seed": [0, 1, 2]},
            panels=(
                Panel("Test accuracy with the EMA statistics", "over_steps", ("test_acc",),
                      "test accuracy"),
                Panel("Test accuracy with PreciseBN's population statistics", "over_steps",
                      ("test_acc_precise",), "test accuracy"),
                Panel("EMA against population: mean gap of the last block (in std)",
                      "over_steps", ("ema_mean_gap",), "RMS gap / std", layer="last"),
            ),
            full={"steps": 5000, "model.depth": 3, "eval_interval": 250, "precise_bn": 32},
            note="A ResNet-8 with 16-64 channels on MNIST-1D; 8 batches of 256 (2048 examples) "
            "for PreciseBN at each evaluation. Momentum does not change training (BN normalizes "
            "with batch statistics there): a seed's runs share one model, and differ only in the "
            "statistics kept for evaluation. Three seeds: at the final evaluation PreciseBN "
            "must beat the EMA by 2 points at momentum 0.003, and by 2 points more than at 0.3, "
            "beyond 2 standard errors, on every seed.",
        ),
        Experiment(
            key="small-batch-frozen-bn",
            verdict=verdicts.CHECKS["small-batch-frozen-bn"],
            title="Small batches: train/test inconsistency and FrozenBN (Wu & Johnson 2021)",
            claim="With small batches, the batch statistics BN normalizes with in training are "
            "noisy and differ from the population statistics used at test time; training the "
            "last part with FrozenBN (population statistics, fixed) removes that "
            "inconsistency and raises test accuracy, most at the smallest batches (Wu & "
            "Johnson 2021, section 4).",
            base={"model": _RESNET, "data": {"name": "mnist1d"},
                  "optim": {"schedule": "step", "milestones": [0.5, 0.75]}},
            grid={"batch_size": [2, 64], "norm.freeze_after": [None, 0.75], "seed": [0, 1, 2]},
            derive=_frozen_epochs,
            panels=(
                Panel("Final test accuracy by batch size (freeze_after=0.75: FrozenBN)",
                      "by_value", ("test_acc",), "test accuracy", x="batch_size", log_x=True),
                Panel("Test accuracy with each test batch's own statistics (FrozenBN runs: "
                      "before the freeze)", "by_value",
                      ("test_acc_batch",), "test accuracy", x="batch_size", log_x=True),
                _TEST_ACC,
            ),
            provokes=tuple(
                Provoked("small-batch", {"batch_size": b, "norm.freeze_after": None},
                         {"batch_size": 64, "norm.freeze_after": None})
                for b in (2,)
            ),
            full={"model.depth": 3, "model.width": 32},
            note=f"As in the paper, the step schedule's last phase (after 75% of the steps) is "
            f"where FrozenBN takes over, with PreciseBN's population statistics; {ROUNDS} "
            "epochs of MNIST-1D at every batch size, the learning rate 0.1 x B / 32; three "
            "seeds at the smallest and the largest batch (the gain must exceed 1 point and the "
            "seeds' spread, on every seed).",
        ),
        Experiment(
            key="signal-propagation",
            verdict=verdicts.CHECKS["signal-propagation"],
            title="Signal propagation at initialization: BN-ResNet, unnormalized, SkipInit",
            claim="At initialization, the variance of a BN ResNet's residual stream grows "
            "linearly with depth, each residual branch adding about the same, so deep blocks "
            "are close to the identity; without normalization it doubles at every block "
            "(exponential growth) unless each branch is scaled down at initialization, as "
            "SkipInit's zero scalar does; at each stage transition the projection shortcut "
            "restarts the stream at about unit variance (Brock, De & Smith 2021, Figure 1; De "
            "& Smith 2020).",
            base={"model": {"kind": "resnet", "depth": 6, "width": 32, "residual": "pre"},
                  "data": {"name": "mnist1d"}, "batch_size": 128, "steps": 1,
                  "eval_interval": 1, "optim": {"lr": 1e-9, "momentum": 0.0}},
            grid={"norm.kind": ["batch", "none"], "model.skip_init": [False, True],
                  "model.shortcut": ["projection", "zero_pad"]},
            # BN with both shortcuts; unnormalized and SkipInit with the paper's projections
            keep=lambda p: (p["norm.kind"] == "batch" and not p["model.skip_init"])
            or (p["norm.kind"] == "none" and p["model.shortcut"] == "projection"),
            panels=(
                Panel("Average channel variance of each residual block's output",
                      "by_layer", ("signal_var",), "variance (log)", log_y=True),
                Panel("Average channel squared mean of each block's output", "by_layer",
                      ("signal_sq_mean",), "squared mean (log)", log_y=True),
                Panel("Variance of what each residual branch adds", "by_layer",
                      ("branch_var",), "branch variance (log)", log_y=True),
            ),
            full={"model.depth": 50, "model.width": 32, "batch_size": 1024},
            note="Pre-activation ResNet-38 (6 blocks per stage; full: ResNet-302) at "
            "initialization, measured on one batch in training mode (the first evaluation). "
            "The shape is tested within the first stage: linear where the increments stay "
            "constant and a line fits better than an exponential, exponential where the "
            "increments grow as the values do. At a stage transition Brock et al.'s networks "
            "use projection shortcuts (model.shortcut=projection: norm, ReLU and a 1x1 "
            "convolution of the transition block's input), which restart the stream near the "
            "first stage's start: the verdict requires it at both transitions. He et al.'s "
            "parameter-free shortcut (zero_pad: stride, then zero padding of the new channels), "
            "run beside it with BN, carries the stream on averaged with as many zero channels, "
            "so its average channel variance halves there and the next branch adds to that: "
            "this figure drops less at each transition than Brock et al.'s (the verdict gives "
            "both drops).",
        ),
        Experiment(
            key="scale-invariance",
            verdict=verdicts.CHECKS["scale-invariance"],
            title="Scale invariance: weight norm and effective learning rate",
            claim="A weight followed by BN is scale-invariant: the output does not change when "
            "it is scaled, and its gradient is orthogonal to it, so SGD without weight decay "
            "only grows its norm and the effective learning rate lr/||w||^2 falls by itself; "
            "weight decay holds the norm and keeps the effective learning rate up (van "
            "Laarhoven 2017; Hoffer et al. 2018; Arora et al. 2019).",
            base={"model": {**_RESNET, "width": 8}, "data": {"name": "mnist1d"},
                  "batch_size": 64, "steps": 1500, "eval_interval": 100, "stats_interval": 5,
                  "optim": {"lr": 0.1, "norm_weight_decay": False}},
            grid={"optim.weight_decay": [0.0, 5e-4, 5e-3], "seed": [0, 1, 2]},
            panels=(
                Panel("Weight norm of the last block", "over_steps", ("weight_norm",),
                      "||w||", layer="last"),
                Panel("Effective learning rate lr/||w||^2 of the last block", "over_steps",
                      ("eff_lr",), "lr / ||w||^2", layer="last"),
                Panel("Angular update per step of the last block", "over_steps",
                      ("angular_update",), "radians", layer="last"),
                _TEST_ACC,
            ),
            full={"steps": 20_000, "model.depth": 3},
            note="Weight decay applies to the convolutions only (optim.norm_weight_decay=false)"
            "; the last block's convolution is followed by BN, so it is scale-invariant. Three "
            "seeds: without weight decay the norm must grow by 20% and the effective learning "
            "rate fall, and the largest weight decay must end 20% under it, beyond 2 standard "
            "errors, on every seed.",
        ),
        Experiment(
            key="per-replica-vs-sync-bn",
            verdict=verdicts.CHECKS["per-replica-vs-sync-bn"],
            title="Data-parallel: per-replica BN against synchronized BN",
            claim="Under data-parallel training each replica's BN normalizes with its own share "
            "of the batch, so what BN's accuracy depends on is the per-replica batch (Wu & He "
            "2018; Wu & Johnson 2021); synchronizing the statistics over the replicas "
            "normalizes with the global batch, which recovers the accuracy lost at small "
            "per-replica batches, at the cost of communication in every BN layer.",
            base={"model": {"kind": "mlp", "depth": 3, "width": 64}, "data": {"name": "digits"},
                  "eval_interval": 100, "stats_interval": 10, "distributed": {"replicas": 2}},
            grid={"batch_size": [4, 8, 32], "distributed.sync_bn": [False, True],
                  "seed": [0, 1, 2]},
            derive=_same_epochs,
            panels=(
                Panel("Final test accuracy by global batch (2 replicas)", "by_value",
                      ("test_acc",), "test accuracy", x="batch_size", log_x=True),
                Panel("Replicas' batch means around the global batch's, last layer", "by_value",
                      ("replica_mean_spread",), "RMS, in std", x="batch_size", log_x=True,
                      layer="last", reduce="mean"),
                Panel("Step time", "by_value", ("step_time",), "seconds per step",
                      x="batch_size", log_x=True, reduce="mean"),
            ),
            provokes=(
                Provoked("ddp-without-syncbn", {"batch_size": 4, "distributed.sync_bn": False},
                         {"batch_size": 4, "distributed.sync_bn": True}),
            ),
            full={"model.width": 256, "device": "cuda"},
            note=f"2 processes over gloo on the CPU (NCCL with a GPU each at full size), equal "
            f"epochs ({EPOCHS} of digits) at every batch size with the learning rate scaled "
            "with it; an MLP, whose BN takes each channel's statistics over the per-replica "
            "examples only. Three seeds: at the smallest batch synchronized BN must gain 2 "
            "points, and more than at the largest, beyond 2 standard errors, on every seed; the "
            "step time is shown, not tested (it is the machine's).",
        ),
    )
}  # fmt: skip

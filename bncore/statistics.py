"""Every statistic BN Scope records, in one registry: its name, what it means, its unit, which
records table holds it, and how a chart shows it.

The records' column lists (bncore.record.tables), the API's check of a statistic's name, the
dashboard's labels and axes, and docs/statistics.md (:func:`markdown`; a test keeps it current)
are all read from here. A statistic is added here, and computed where it is recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

Table = Literal["steps", "evals", "layers", "layer_evals", "channels"]


@dataclass(frozen=True)
class Statistic:
    """One recorded quantity.

    ``table``: the records table of its rows (``steps``: one per training step, ``evals``: one
    per evaluation, ``layers``: one per recorded step and block, ``layer_evals``: one per
    evaluation and block, ``channels``: per-channel arrays every ``channel_interval`` steps).
    ``optional``: only in runs that ask for it. ``label``: the short name a chart uses.
    ``log``: drawn on a log axis. ``compare``: offered when comparing runs.
    """

    name: str
    table: Table
    meaning: str
    label: str
    unit: str = ""
    optional: bool = False
    log: bool = False
    compare: bool = False

    @property
    def per_layer(self) -> bool:
        return self.table in ("layers", "layer_evals", "channels")


def _s(name: str, table: Table, meaning: str, label: str, **kw: object) -> Statistic:
    return Statistic(name, table, meaning, label, **kw)  # type: ignore[arg-type]


_PRE = "what enters the normalization (for BN: the statistics it normalized with)"
_ALL: tuple[Statistic, ...] = (
        # -- steps ------------------------------------------------------------------------
        _s("loss", "steps", "training loss of the step's batch", "train loss (batch)", log=True),
        _s("lr", "steps", "learning rate of the step", "learning rate"),
        _s("step_time", "steps", "seconds the step took, as seen by the host", "step time",
           unit="s"),
        _s("time", "steps", "wall clock at the step's end", "time", unit="Unix s"),
        # -- evals ------------------------------------------------------------------------
        _s("train_loss", "evals", "loss on training examples, in eval mode", "train loss (eval)",
           log=True),
        _s("train_acc", "evals", "accuracy on training examples, in eval mode",
           "train accuracy", unit="share"),
        _s("test_loss", "evals", "loss on the test set, in eval mode", "test loss (eval)",
           log=True),
        _s("test_acc", "evals", "accuracy on the test set, in eval mode", "test accuracy",
           unit="share"),
        _s("mode_gap", "evals", "relative L2 distance between the logits of a fixed probe batch "
           "in train mode and in eval mode", "train-vs-eval mode gap"),
        _s("landscape_loss_min", "evals", "least loss along the gradient direction "
           "(bncore.run.landscape)", "landscape: least loss", optional=True),
        _s("landscape_loss_max", "evals", "largest loss along the gradient direction",
           "landscape: largest loss", optional=True),
        _s("landscape_loss_range", "evals", "spread of the loss along the gradient direction "
           "(Santurkar et al., Fig. 4)", "landscape: loss range", optional=True),
        _s("grad_change", "evals", "largest change of the gradient along the gradient "
           "direction", "landscape: gradient change", optional=True),
        _s("beta_smoothness", "evals", "effective beta-smoothness: gradient change over "
           "distance along the gradient direction", "effective beta-smoothness", optional=True),
        _s("test_acc_precise", "evals", "test accuracy with the population statistics that "
           "PreciseBN recomputes (bncore.run.population; runs with precise_bn, until FrozenBN "
           "fixes the statistics)",
           "test accuracy, PreciseBN statistics", unit="share", optional=True),
        _s("test_loss_precise", "evals", "test loss with the PreciseBN population statistics",
           "test loss, PreciseBN statistics", optional=True, log=True),
        _s("test_acc_batch", "evals", "test accuracy in training mode: each batch of "
           "batch_size test examples normalized with its own statistics (runs with "
           "precise_bn)", "test accuracy, batch statistics", unit="share", optional=True),
        # -- layers -----------------------------------------------------------------------
        _s("pre_mean", "layers", f"channel average of the batch mean of {_PRE}",
           "BN input mean (batch)", compare=True),
        _s("pre_mean_abs", "layers", "channel average of the batch mean's magnitude of what "
           "enters the normalization", "BN input |mean| (batch)"),
        _s("pre_var", "layers", f"channel average of the batch variance of {_PRE}",
           "BN input variance (batch)", log=True, compare=True),
        _s("pre_var_min", "layers", "least channel batch variance of what enters the "
           "normalization", "BN input variance, least channel", log=True),
        _s("pre_var_max", "layers", "largest channel batch variance of what enters the "
           "normalization", "BN input variance, largest channel", log=True),
        _s("post_mean", "layers", "channel average of the batch mean of what leaves the "
           "normalization", "BN output mean", compare=True),
        _s("post_var", "layers", "channel average of the batch variance of what leaves the "
           "normalization", "BN output variance", compare=True),
        _s("act_mean", "layers", "channel average of the batch mean of the activation's output",
           "activation mean"),
        _s("act_var", "layers", "channel average of the batch variance of the activation's "
           "output", "activation variance", compare=True),
        _s("act_saturated", "layers", "share of activation outputs at rest or saturated: ReLU = "
           "0, sigmoid <= 0.01 or >= 0.99, tanh |y| >= 0.99 (0 for linear)",
           "saturated-unit fraction", unit="share", compare=True),
        _s("act_dead", "layers", "share of units at rest or saturated for the whole batch "
           "(dead ReLUs)", "dead-unit fraction", unit="share", compare=True),
        _s("running_mean", "layers", "channel average of the running mean (NaN without)",
           "running mean"),
        _s("running_var", "layers", "channel average of the running variance (NaN without)",
           "running variance", log=True),
        _s("running_mean_gap", "layers", "RMS over channels of running mean minus batch mean",
           "running-mean gap (RMS)", compare=True),
        _s("running_var_gap", "layers", "RMS over channels of running variance minus batch "
           "variance", "running-variance gap (RMS)", compare=True),
        _s("gamma", "layers", "channel average of the BN scale (NaN without)", "gamma (mean)",
           compare=True),
        _s("beta", "layers", "channel average of the BN shift (NaN without)", "beta (mean)",
           compare=True),
        _s("gamma_grad_norm", "layers", "L2 norm of dL/dgamma (= sum dy*xhat)",
           "gamma gradient norm", log=True, compare=True),
        _s("beta_grad_norm", "layers", "L2 norm of dL/dbeta (= sum dy); without BN, the norm a "
           "bias there would get", "beta gradient norm", log=True),
        _s("grad_out_norm", "layers", "L2 norm of the activation gradient reaching the "
           "normalization's output", "gradient norm reaching the layer's output", log=True),
        _s("grad_in_norm", "layers", "L2 norm of the activation gradient leaving through the "
           "normalization's input", "gradient norm into the layer", log=True, compare=True),
        _s("weight_grad_norm", "layers", "L2 norm of the gradient of the linear/conv weight "
           "feeding the block", "weight gradient norm", log=True, compare=True),
        _s("weight_norm", "layers", "L2 norm ||w|| of the block's linear/conv weight, before "
           "the step's update: a weight that a normalization follows is scale-invariant, and "
           "its norm grows under SGD without weight decay (van Laarhoven 2017); BN Scope's own "
           "networks: every channel_interval recorded steps", "weight norm",
           log=True, compare=True),
        _s("eff_lr", "layers", "effective learning rate lr/||w||^2 of the block's weight: "
           "the step a scale-invariant weight takes on its sphere (Hoffer et al. 2018, Arora "
           "et al. 2019; BN Scope's own networks)", "effective learning rate lr/||w||^2",
           optional=True, log=True, compare=True),
        _s("angular_update", "layers", "angle between the block's weight before and after the "
           "step's update (BN Scope's own networks; every channel_interval recorded steps: it "
           "needs a copy of the weights)", "angular update", unit="rad", optional=True,
           log=True, compare=True),
        _s("layer_bias_grad_norm", "layers", "L2 norm of the linear/conv layer's own bias "
           "gradient (NaN without one); BN right after the layer makes it zero",
           "layer bias gradient norm", log=True),
        _s("replica_mean_spread", "layers", "distributed runs: RMS over replicas and channels "
           "of each replica's batch mean minus the global batch's, in global standard "
           "deviations (what synchronized BN removes)", "replicas' mean around the global "
           "(RMS, in std)", optional=True, log=True, compare=True),
        _s("replica_var_spread", "layers", "distributed runs: RMS over replicas and channels "
           "of each replica's batch variance's relative difference from the global batch's",
           "replicas' variance around the global (RMS, relative)", optional=True, log=True,
           compare=True),
        _s("global_pre_mean", "layers", "distributed runs: channel average of the global "
           "batch's mean (all replicas' examples)", "global batch mean", optional=True),
        _s("global_pre_var", "layers", "distributed runs: channel average of the global "
           "batch's variance", "global batch variance", optional=True, log=True),
        _s("ics", "layers", "internal covariate shift ||G - G'||: the weight gradient before and "
           "after the blocks below took their step (Santurkar et al.; runs with ics_interval)",
           "internal covariate shift ||G - G'|| (runs with ics_interval)", optional=True,
           compare=True),
        _s("ics_cos", "layers", "cos(G, G') of the same two gradients", "internal covariate "
           "shift: cos(G, G')", optional=True, compare=True),
        _s("batch_n", "layers", "watched models: N, the examples in the normalization batch "
           "(the input's first dimension), averaged over the layer's training forwards since "
           "the last logged step (NaN: none)", "normalization batch N", unit="examples",
           optional=True, log=True),
        _s("batch_m", "layers", "watched models: m, the values per channel the batch "
           "statistics are taken over (N times the spatial size), averaged like batch_n",
           "values per channel m", unit="values", optional=True, log=True),
        _s("forwards", "layers", "watched models: k, the layer's training-mode forwards since "
           "the last logged step (micro-batches of gradient accumulation; 0: it did not run "
           "in training mode)", "training forwards per logged step", unit="forwards",
           optional=True),
        _s("forwards_no_grad", "layers", "watched models: how many of those forwards ran with "
           "autograd disabled (torch.no_grad: evaluation in training mode, whose batches "
           "overwrite the running statistics)", "training-mode forwards without gradient",
           unit="forwards", optional=True),
        _s("backwards", "layers", "watched models: backward passes through the layer since "
           "the last logged step (a pass counts once however often the layer ran in its graph: "
           "two views through one encoder are two forwards and one backward; counted at "
           "gamma's gradient, or at the layer's backward node where gamma is not trained)",
           "backward passes per logged step", unit="backwards", optional=True),
        # -- layer_evals: per evaluation and block ---------------------------------------
        _s("ema_mean_gap", "layer_evals", "RMS over channels of the EMA running mean minus the "
           "PreciseBN population mean, in population standard deviations (Wu & Johnson 2021; "
           "runs with precise_bn)", "EMA vs population: mean gap (in std)", optional=True,
           log=True, compare=True),
        _s("ema_var_gap", "layer_evals", "RMS over channels of the EMA running variance's "
           "relative error against the population variance", "EMA vs population: relative "
           "variance gap", optional=True, log=True, compare=True),
        _s("eval_mean_gap", "layer_evals", "RMS over channels of the probe batch's eval-mode "
           "input mean minus the running mean, in running standard deviations "
           "sqrt(running_var + eps) (the mode-gap probe: bnscope.client's probe, bncore runs "
           "with eval_gaps)", "eval input vs running: mean gap (in std)", optional=True,
           log=True, compare=True),
        _s("eval_var_gap", "layer_evals", "RMS over channels of the probe batch's eval-mode "
           "input variance (unbiased) minus the running variance, relative to running_var + "
           "eps", "eval input vs running: relative variance gap", optional=True, log=True,
           compare=True),
        _s("signal_sq_mean", "layer_evals", "residual networks, at each residual block's last "
           "unit: average channel squared mean of the block's output in training mode (Brock "
           "et al. 2021's signal propagation)", "average channel squared mean",
           optional=True, log=True, compare=True),
        _s("signal_var", "layer_evals", "average channel variance of the residual block's "
           "output", "average channel variance", optional=True, log=True, compare=True),
        _s("branch_var", "layer_evals", "average channel variance of what the residual branch "
           "added (after SkipInit's scalar)", "residual branch variance", optional=True,
           log=True, compare=True),
        # -- channels (per-channel arrays, one row of C values per layer and kept step) ----
        *(
            _s(name, "channels", meaning, name.replace("_", " "))
            for name, meaning in (
                ("pre_mean", "batch mean of each channel entering the normalization"),
                ("pre_var", "batch variance of each channel entering the normalization"),
                ("post_mean", "batch mean of each channel leaving the normalization"),
                ("post_var", "batch variance of each channel leaving the normalization"),
                ("act_mean", "batch mean of each channel of the activation's output"),
                ("act_var", "batch variance of each channel of the activation's output"),
                ("act_saturated", "share of each channel's activation outputs at rest or "
                 "saturated"),
                ("running_mean", "running mean of each channel"),
                ("running_var", "running variance of each channel"),
                ("gamma", "BN scale of each channel"),
                ("beta", "BN shift of each channel"),
                ("gamma_grad", "dL/dgamma of each channel"),
                ("beta_grad", "dL/dbeta of each channel"),
                ("grad_out_sq", "sum of squared gradients reaching each channel's output"),
                ("grad_in_sq", "sum of squared gradients leaving through each channel's input"),
            )
        ),
)  # fmt: skip
#: Every statistic with one value per row: of steps, evaluations or layers.
STATISTICS: dict[str, Statistic] = {s.name: s for s in _ALL if s.table != "channels"}
#: The per-channel arrays of the ``channels`` table (names shared with their layer averages).
CHANNEL_STATISTICS: dict[str, Statistic] = {s.name: s for s in _ALL if s.table == "channels"}
#: What to look for in a chart of a statistic: the one line a figure of it is captioned with
#: (the dashboard and the report), and the same line in docs/statistics.md.
LOOK_FOR: dict[str, str] = {
    "loss": "a steady fall; spikes or a plateau from the first steps point at the learning "
    "rate, NaN at divergence",
    "mode_gap": "train and test accuracy rising together; a mode gap that grows means eval "
    "mode's running statistics no longer match the batches",
    "pre_var": "a layer whose colour drifts over the steps, or variance that grows or "
    "collapses with depth: what BN takes out at each layer",
    "pre_mean": "strong red or blue that stays: a layer whose input is shifted far from 0, "
    "which BN removes every step (and beta must not put back)",
    "grad_out_norm": "norms that change by decades from the output to the input: exploding "
    "or vanishing gradients",
    "pre_var_min": "a channel far darker than its layer (variance near 0): a dead or constant "
    "channel, normalized by eps alone",
    "running_mean": "the dotted running statistics following the solid batch ones with a lag; "
    "a gap that never closes: momentum too small, or the statistics not updating",
    "running_var_gap": "gaps that shrink toward 0 as training settles; gamma falling toward "
    "0 silences the layer",
    "weight_grad_norm": "gradient norms against the weight's own norm: one falling to 0 "
    "stops that layer learning",
    "eff_lr": "the weight norm growing and lr/||w||^2 falling with it (scale invariance); "
    "weight decay holds them steady",
    "replica_var_spread": "replicas whose batches differ from the global batch: per-replica BN "
    "with small per-device batches, which SyncBatchNorm removes",
    "act_saturated": "shares far above 0.5 for ReLU (or near 1 for sigmoid and tanh): units "
    "at rest or saturated; about 0.5 is a healthy ReLU",
    "ema_mean_gap": "gaps still large at the latest evaluation: the EMA running statistics "
    "lag the population (PreciseBN, or a larger momentum)",
    "signal_var": "variance growing about linearly with depth with BN, exponentially "
    "without (Brock et al. 2021)",
    "grad_in_norm": "a layer whose gradient grows or fades over the steps or through depth",
    "p50_j": "a unit's band steady over the steps with BN, drifting without as the layers "
    "below learn (Ioffe & Szegedy, Fig. 1)",
}
#: Percentiles of tracked unit j's activation input: p15_j, p50_j, p85_j.
PERCENTILE = re.compile(r"p(15|50|85)_(\d+)")
#: Replica k's own batch statistics in a distributed run: r{k}_pre_mean, r{k}_pre_var.
REPLICA = re.compile(r"r(\d)_pre_(mean|var)")
#: A script's own evaluation metric (bnscope.client's ``log_eval``): user_<name>, the name as
#: the script gave it with every character other than a letter, digit or _ written as _.
USER_METRIC = re.compile(r"user_([A-Za-z0-9_]{1,59})")


def columns(table: Table, optional: bool = False) -> tuple[str, ...]:
    """The names of a table's statistics, in registry order (``optional``: only those)."""
    reg = CHANNEL_STATISTICS if table == "channels" else STATISTICS
    return tuple(s.name for s in reg.values() if s.table == table and s.optional == optional)


def lookup(name: str) -> Statistic | None:
    """A statistic with one value per row, by name (the percentiles p15_j/p50_j/p85_j, the
    replicas' r{k}_pre_mean/var and a script's own user_<name> metrics too)."""
    if name in STATISTICS:
        return STATISTICS[name]
    r = REPLICA.fullmatch(name)
    if r is not None:
        what = "mean" if r[2] == "mean" else "variance"
        return Statistic(
            name, "layers",
            f"distributed runs: channel average of replica {r[1]}'s own batch {what}",
            f"replica {r[1]} batch {what}", log=r[2] == "var",
        )  # fmt: skip
    u = USER_METRIC.fullmatch(name)
    if u is not None:
        return Statistic(
            name, "evals", f"the script's own evaluation metric {u[1]!r} (log_eval)", u[1]
        )
    m = PERCENTILE.fullmatch(name)
    if m is None:
        return None
    return Statistic(
        name,
        "layers",
        f"{m[1]}th percentile over the batch of tracked unit {m[2]}'s activation input "
        "(Ioffe & Szegedy, Fig. 1)",
        f"unit {m[2]} {m[1]}%",
    )


def unknown(name: str) -> str:
    """What to say about a statistic that is not recorded: the name, and every known one."""
    groups = {
        "per step": [*columns("steps")],
        "per evaluation": [*columns("evals"), *columns("evals", optional=True), "user_<name>"],
        "per layer": [
            *columns("layers"),
            *columns("layers", optional=True),
            "p15_j/p50_j/p85_j",
            "r{k}_pre_mean/r{k}_pre_var",
        ],
        "per layer and evaluation": [*columns("layer_evals", optional=True)],
    }
    return f"unknown stat {name!r}; " + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())


#: The headings of the records tables, as docs/statistics.md orders them.
TABLE_HEADINGS: dict[Table, str] = {
    "steps": "Per training step (`steps`)",
    "evals": "Per evaluation, in eval mode (`evals`)",
    "layers": "Per recorded step and block (`layers`)",
    "layer_evals": "Per evaluation and block (`layer_evals`)",
    "channels": "Per channel, every `channel_interval` steps (`channels`)",
}


@dataclass(frozen=True)
class Documented:
    """A row of the statistics' documentation: one statistic, or a family (``p50_j``)."""

    table: Table
    names: tuple[str, ...]
    meaning: str
    unit: str
    shown: str
    look_for: str

    @property
    def anchor(self) -> str:
        """Where its documentation is, in the page (``#name``): its first name."""
        return self.names[0]


@cache
def documented() -> tuple[Documented, ...]:
    """Every statistic and family of statistics, by table, as documented (docs/statistics.md,
    and the page the dashboard's captions link to); the registry is fixed: made once."""
    out = []
    for table in TABLE_HEADINGS:
        for s in _ALL:
            if s.table == table:
                extra = " (only in runs that ask for it)" if s.optional else ""
                shown = s.label + (", log axis" if s.log else "")
                look = LOOK_FOR.get(s.name, "") if table != "channels" else ""
                out.append(Documented(table, (s.name,), s.meaning + extra, s.unit, shown, look))
        if table == "evals":
            out.append(Documented(
                table, ("user_<name>",), "a script's own evaluation metric, as its `log_eval` "
                "names it (bnscope.client; other characters than letters, digits and _ as _)",
                "", "<name>", ""))  # fmt: skip
        if table == "layers":
            out.append(Documented(
                table, ("p50_j", "p15_j", "p85_j"), "15th/50th/85th percentiles over the batch "
                "of tracked unit j's activation input (Ioffe & Szegedy, Fig. 1)", "", "unit j",
                LOOK_FOR["p50_j"]))  # fmt: skip
            out.append(Documented(
                table, ("r{k}_pre_mean", "r{k}_pre_var"), "distributed runs: channel averages "
                "of replica k's own batch mean and variance", "", "replica k", ""))  # fmt: skip
    return tuple(out)


def markdown() -> str:
    """docs/statistics.md: every statistic, by table, and what to look for in its chart."""
    out = [
        "# What BN Scope records",
        "",
        "Generated from `bncore/statistics.py` (`markdown()`); "
        "tests/bncore/test_statistics.py keeps it current.",
    ]
    rows = documented()
    for table, head in TABLE_HEADINGS.items():
        out += ["", f"## {head}", "", "| name | meaning | unit | shown as | what to look for |",
                "|---|---|---|---|---|"]  # fmt: skip
        for d in (d for d in rows if d.table == table):
            names = ", ".join(f"`{n}`" for n in sorted(d.names))
            out.append(f"| {names} | {d.meaning} | {d.unit} | {d.shown} | {d.look_for} |")
    return "\n".join(out) + "\n"

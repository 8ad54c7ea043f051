"""What the watcher records for the BN doctor (issue 26, BN_PITFALLS section 3): the layers'
configuration, the model's structure and the optimizer's weight decay in its meta; per logged
step and layer the normalization batch (N, m) and the forwards and backward passes; and the
mode-gap probe (bncore.record.probe), against hand computations on models built to have each."""

from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncore
from bncore.record.probe import mode_gap_probe
from bncore.record.watcher import Watcher
from tests.helpers import on_ranks


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's shape: fixed statistics and affine, as
    buffers; never a training-mode batch norm."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                            ("running_var", 1.0)):  # fmt: skip
            self.register_buffer(name, torch.full((c,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def rows_of(rec, name: str) -> dict[str, np.ndarray]:
    """One layer's rows of a flushed ``layers`` table, by column."""
    sel = rec.layers["layer"] == name
    return {k: v[sel] for k, v in rec.layers.items()}


# -- meta: the layers' configuration and every BN module -----------------------------------


def test_layer_config_names_each_layers_settings_and_bn_modules_every_bn_module():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),  # 0
        nn.BatchNorm2d(4, momentum=None, eps=1e-3),  # 1: the cumulative average
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, bias=False),  # 3
        nn.BatchNorm2d(5, track_running_stats=False),  # 4
        FrozenBatchNorm2d(5),  # 5: torchvision's, never a training-mode BN
        bncore.BatchNorm2d(5, momentum=0.3),  # 6: bncore's own
        nn.InstanceNorm2d(5),  # 7: not a batch norm
        nn.BatchNorm2d(5, affine=False),  # 8
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6, bias=False),  # 10
        nn.SyncBatchNorm(6),  # 11: outside a process group
    )
    model[1].add_module("spare", nn.BatchNorm1d(6))  # never runs
    w = Watcher(model)
    every = ["1", "1.spare", "4", "5", "6", "8", "11"]
    assert w.meta()["bn_modules"] == every  # before any forward
    model(torch.randn(8, 3, 8, 8)).sum().backward()
    w.log(1)
    meta = w.meta()
    assert list(meta["layer_config"]) == ["1", "4", "6", "8", "11"]  # the recorded ones
    cfg = meta["layer_config"]
    assert cfg["1"] == {"class": "BatchNorm2d", "momentum": None, "eps": 1e-3, "affine": True,
                        "track_running_stats": True, "dtype": "float32",
                        "input_dtype": "float32"}  # fmt: skip
    assert cfg["4"]["affine"] is True and cfg["4"]["track_running_stats"] is False
    assert cfg["4"]["dtype"] == "float32" and cfg["4"]["momentum"] == 0.1
    assert cfg["6"]["class"] == "BatchNorm2d" and cfg["6"]["momentum"] == 0.3
    assert cfg["8"]["affine"] is False and cfg["8"]["track_running_stats"] is True
    assert cfg["11"]["class"] == "SyncBatchNorm" and cfg["11"]["eps"] == 1e-5
    assert meta["bn_modules"] == every
    assert meta["distributed"] == {"world": 1, "sync_bn": False}
    assert "optimizer" not in meta  # none given
    w.close()


def test_layer_config_reads_a_functional_bn_s_call_and_the_dtype_of_a_float64_model():
    class FunctionalBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mu", torch.zeros(4))
            self.register_buffer("sigma2", torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(x, self.mu, self.sigma2, None, None, self.training, 0.25, 1e-4)

    model = nn.Sequential(nn.Linear(3, 4), FunctionalBN()).double()
    w = Watcher(model)
    model(torch.randn(6, 3, dtype=torch.float64))
    w.log(1)
    assert w.meta()["layer_config"]["1"] == {
        "class": "FunctionalBN", "momentum": 0.25, "eps": 1e-4, "affine": False,
        "track_running_stats": True, "dtype": "float64", "input_dtype": "float64",
    }  # fmt: skip
    w.close()


def _sync_bn_in_a_group(rank: int) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    w = Watcher(model)
    assert w.meta()["distributed"] == {"world": 2, "sync_bn": True}
    w.close()
    alone = [torch.distributed.new_group([r]) for r in range(2)][rank]  # every rank makes both
    solo = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4, process_group=alone))
    w = Watcher(solo)
    assert w.meta()["distributed"] == {"world": 2, "sync_bn": False}  # a group of one
    w.close()


def test_distributed_says_whether_sync_bn_synchronizes(tmp_path):
    on_ranks(partial(_sync_bn_in_a_group), tmp_path)


# -- meta: the structure found on the first training forward --------------------------------


def doctor_model(last: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16, bias=False),  # 0
        nn.Dropout(0.3),  # 1: between the weight and its BN
        nn.BatchNorm1d(16),  # 2
        nn.ReLU(),
        nn.Dropout(0.5),  # 4: before the weight: not between it and the BN
        nn.Linear(16, 16),  # 5: a bias before BN
        nn.BatchNorm1d(16),  # 6: gamma zero-initialized
        nn.Tanh(),
        nn.Linear(16, 4, bias=False),  # 8
        nn.Dropout(0.1),
        nn.Dropout(0.2),  # 10: two: the larger p
        nn.BatchNorm1d(4),  # 11
        last,
    )
    nn.init.zeros_(model[6].weight)
    return model


def test_structure_finds_dropout_bias_zero_gamma_activations_and_the_output_bn():
    model = doctor_model(nn.Identity())
    w = Watcher(model)
    assert "structure" not in w.meta()  # not known before the first training forward
    model(torch.randn(8, 8)).sum().backward()
    nn.init.ones_(model[6].weight)  # later changes do not matter: the first forward's
    structure = w.meta()["structure"]
    assert structure == {
        "dropout_before": {"2": 0.3, "11": 0.2},
        "output_layer": "11",  # a BN feeds the model's output
        "zero_init_gamma": ["6"],
        "bias_before": ["6"],
        "activation": {"2": "relu", "6": "tanh"},
    }
    w.close()
    p0 = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Dropout(0.0), nn.BatchNorm1d(4))
    w = Watcher(p0)
    p0(torch.randn(5, 3))
    assert w.meta()["structure"]["dropout_before"] == {}  # p = 0: no dropout
    w.close()


def test_no_output_layer_when_a_linear_follows_the_last_bn_and_eval_forwards_find_nothing():
    model = doctor_model(nn.Linear(4, 2))
    w = Watcher(model)
    model.eval()
    model(torch.randn(8, 8))  # an eval-mode forward: discovery waits for training
    assert "structure" not in w.meta()
    model.train()
    model(torch.randn(8, 8))
    assert w.meta()["structure"]["output_layer"] is None
    w.close()


def test_structure_is_known_at_the_first_log_when_the_watched_module_s_forward_never_runs():
    """Lightning's training_step calls a submodule, never the LightningModule's forward."""

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = doctor_model(nn.Identity())

    outer = Module()
    w = Watcher(outer)
    outer.net(torch.randn(8, 8)).sum().backward()
    assert "structure" not in w.meta()
    w.log(1)
    structure = w.meta()["structure"]
    assert structure["output_layer"] == "net.11" and structure["bias_before"] == ["net.6"]
    assert structure["activation"] == {"net.2": "relu", "net.6": "tanh"}
    w.close()


# -- meta: the optimizer's weight decay -----------------------------------------------------


def test_optimizer_facts_with_and_without_weight_decay_on_the_bn_parameters():
    model = doctor_model(nn.Linear(4, 2))
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()]
    weights = [p for p in model.parameters() if all(p is not q for q in bn)]
    x = torch.randn(8, 8)

    decayed = Watcher(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1,
                                                       weight_decay=1e-4))  # fmt: skip
    assert decayed.meta()["optimizer"]["norm_weight_decay"] == {}  # no layer known yet
    model(x)
    facts = decayed.meta()["optimizer"]
    assert facts == {"class": "SGD", "norm_weight_decay": {"2": 1e-4, "6": 1e-4, "11": 1e-4},
                     "weight_decay": 1e-4}  # fmt: skip
    decayed.close()

    excluded = torch.optim.AdamW([{"params": weights, "weight_decay": 5e-2},
                                  {"params": bn[2:], "weight_decay": 0.0}])  # fmt: skip
    w = Watcher(model, optimizer=excluded)  # layer 2's gamma and beta are in no group
    model(x)
    facts = w.meta()["optimizer"]
    assert facts == {"class": "AdamW", "norm_weight_decay": {"2": 0.0, "6": 0.0, "11": 0.0},
                     "weight_decay": 5e-2}  # fmt: skip
    w.close()

    only_bn = torch.optim.SGD([{"params": bn, "weight_decay": 3e-3}], lr=0.1)
    w = Watcher(model, optimizer=[only_bn])  # no feeding weight in any group
    model(x)
    facts = w.meta()["optimizer"]
    assert facts["norm_weight_decay"] == {"2": 3e-3, "6": 3e-3, "11": 3e-3}
    assert facts["weight_decay"] is None
    w.close()


# -- per step and layer: the normalization batch and the forwards ---------------------------


def mlp_and_sequence_bn() -> nn.Module:
    """A 1-d BN over (N, C) (m = N) and one over (N, C, L) (m = N L)."""
    return nn.Sequential(
        nn.Linear(6, 8, bias=False),
        nn.BatchNorm1d(8),  # 1: (N, 8)
        nn.ReLU(),
        nn.Unflatten(1, (2, 4)),
        nn.BatchNorm1d(2),  # 4: (N, 2, 4)
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def test_batch_n_and_m_under_gradient_accumulation_and_forwards_and_backwards():
    torch.manual_seed(0)
    model = mlp_and_sequence_bn()
    w = Watcher(model, measure_interval=2)
    sizes = (8, 8, 8, 4)  # k = 4 micro-batches
    for step in (1, 2):  # an unmeasured step, then a measured one: both count backwards
        for n in sizes:
            F.cross_entropy(model(torch.randn(n, 6)), torch.randint(0, 3, (n,))).backward()
        w.log(step)
    model(torch.randn(5, 6))  # a forward whose loss is dropped: no backward through it
    with torch.no_grad():
        for _ in range(2):  # "validation", in training mode
            model(torch.randn(10, 6))
    w.log(3)
    w.log(4)  # nothing ran since the last log
    rec = w.flush()
    one, seq = rows_of(rec, "1"), rows_of(rec, "4")
    np.testing.assert_array_equal(one["step"], [1, 2, 3, 4])
    np.testing.assert_array_equal(one["forwards"], [4, 4, 3, 0])
    np.testing.assert_array_equal(one["forwards_no_grad"], [0, 0, 2, 0])
    np.testing.assert_array_equal(one["backwards"], [4, 4, 0, 0])
    np.testing.assert_allclose(one["batch_n"][:3], [7, 7, 25 / 3])  # the forwards' average
    np.testing.assert_allclose(one["batch_m"][:3], [7, 7, 25 / 3])  # (N, C): m = N
    np.testing.assert_allclose(seq["batch_n"][:3], [7, 7, 25 / 3])
    np.testing.assert_allclose(seq["batch_m"][:3], [28, 28, 100 / 3])  # (N, C, L): m = N L
    assert math.isnan(one["batch_n"][3]) and math.isnan(seq["batch_m"][3])
    assert math.isnan(one["pre_var"][3])  # as before: no batch statistics without a forward
    w.close()


def test_backwards_are_passes_counted_at_gamma_or_at_the_node_where_gamma_is_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 6),
                          nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6, affine=False),
                          bncore.BatchNorm1d(6))  # fmt: skip
    model[3].weight.requires_grad_(False)  # frozen: its backward nodes count
    bncore_frozen = model[6].weight
    w = Watcher(model, measure_interval=3)
    bncore_frozen.requires_grad_(False)  # frozen after watch(), before its first forward
    for step in (1, 2, 3):  # measured, unmeasured, unmeasured
        a, b = model(torch.randn(8, 4)), model(torch.randn(8, 4))  # one model, two views
        (a - b).square().sum().backward()
        w.log(step)
    rec = w.flush()
    for name, passes in (("1", 1), ("3", 2), ("5", 2), ("6", 2)):
        r = rows_of(rec, name)
        np.testing.assert_array_equal(r["forwards"], [2, 2, 2], err_msg=name)
        # a trained gamma counts the one backward pass; a node hook each node it went through
        np.testing.assert_array_equal(r["backwards"], [passes] * 3, err_msg=name)
    # one hook, on the trained gamma: in C++ where the fused kernel is, else in Python
    counted = w.layers["1"].counted_in_cpp
    hooked = [p for p in model.parameters() if p._post_accumulate_grad_hooks]
    assert hooked == ([] if counted else [model[1].weight])
    assert all(w.layers[k].counted_in_cpp is None for k in ("3", "5", "6"))
    w.close()
    assert not model[1].weight._post_accumulate_grad_hooks  # close() leaves nothing
    model(torch.randn(8, 4)).sum().backward()
    assert counted is None or counted.take() == 0, "close() leaves the C++ hook too"


def test_batch_m_of_a_2d_bn_and_of_bncore_s_own_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),  # 1: torch's
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False),
        bncore.BatchNorm2d(4),  # 4: bncore's own, recorded through its Recording
        nn.ReLU(),
    )
    w = Watcher(model)
    for n in (6, 2):
        model(torch.randn(n, 3, 9, 9)).sum().backward()
    with torch.no_grad():
        model(torch.randn(3, 3, 9, 9))
    w.log(1)
    model.eval()
    model(torch.randn(3, 3, 9, 9))  # eval mode: not a training forward
    model.train()
    w.log(2)
    rec = w.flush()
    for name, hw in (("1", 7 * 7), ("4", 5 * 5)):
        r = rows_of(rec, name)
        np.testing.assert_array_equal(r["forwards"], [3, 0], err_msg=name)
        np.testing.assert_array_equal(r["forwards_no_grad"], [1, 0], err_msg=name)
        np.testing.assert_array_equal(r["backwards"], [2, 0], err_msg=name)
        assert r["batch_n"][0] == pytest.approx(11 / 3), name
        assert r["batch_m"][0] == pytest.approx(11 / 3 * hw), name
        assert math.isnan(r["batch_n"][1]), name
    w.close()


def test_a_layer_that_first_runs_later_counts_no_forwards_before():
    torch.manual_seed(0)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
            self.use_b = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x) if self.use_b else self.a(x)

    model = Branchy()
    w = Watcher(model)
    model(torch.randn(4, 3))
    w.log(1)
    model.use_b = True
    model(torch.randn(4, 3))
    w.log(2)
    rec = w.flush()
    b = rows_of(rec, "b")
    np.testing.assert_array_equal(b["forwards"], [0, 1])
    assert math.isnan(b["batch_n"][0]) and b["batch_n"][1] == 4
    np.testing.assert_array_equal(rows_of(rec, "a")["forwards"], [1, 0])
    w.close()


# -- the mode-gap probe ---------------------------------------------------------------------


def probe_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),  # 1
        nn.ReLU(),
        nn.Dropout(0.5),  # draws in train mode: the probe must put the random state back
        nn.Linear(8, 8),
        nn.BatchNorm1d(8, momentum=None),  # 5: the batch count matters
        nn.Linear(8, 3),
        nn.BatchNorm1d(3),  # 7: kept in eval mode by the script (frozen)
    )


def _gaps_by_hand(bn: nn.BatchNorm1d, x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    mean, var = x.mean(0), x.var(0, unbiased=True)
    mean_gap = ((mean - rm) / (rv + bn.eps).sqrt()).square().mean().sqrt()
    var_gap = ((var - rv) / (rv + bn.eps)).square().mean().sqrt()
    return float(mean_gap), float(var_gap)


def test_probe_numbers_against_a_hand_computation_and_no_trace_left():
    torch.manual_seed(0)
    model = probe_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):  # running statistics behind the moving weights
        loss = F.cross_entropy(model(torch.randn(16, 4) * 2 + 1), torch.randint(0, 3, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model[7].eval()
    x = torch.randn(12, 4)
    ref = copy.deepcopy(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    found = mode_gap_probe(model, x, {"1": model[1], "5": model[5], "7": model[7]})

    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():
        ref.eval()  # by hand: the eval-mode pass, layer by layer
        h1 = ref[0](x)
        h5 = ref[4](ref[3](ref[2](ref[1](h1))))
        h7 = ref[6](ref[5](h5))
        y_eval = ref[7](h7)
        expected = {"1": _gaps_by_hand(ref[1], h1), "5": _gaps_by_hand(ref[5], h5),
                    "7": _gaps_by_hand(ref[7], h7)}  # fmt: skip
        ref.train()
        ref[7].eval()  # train mode as the script trains: the frozen layer stays frozen
        torch.set_rng_state(rng)  # the same dropout mask
        y_train = ref(x)
    assert found.layers.keys() == expected.keys()
    for name, (mean_gap, var_gap) in expected.items():
        assert found.layers[name][0] == pytest.approx(mean_gap, rel=1e-9), name
        assert found.layers[name][1] == pytest.approx(var_gap, rel=1e-9), name
        assert mean_gap > 0.05, name  # the statistics did lag
    gap = float((y_train - y_eval).norm() / y_eval.norm())
    assert found.mode_gap == pytest.approx(gap, rel=1e-6) and gap > 0.01


def test_probe_of_a_model_in_eval_mode_trains_every_module_and_skips_untracked_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False),
                          nn.Linear(6, 2))  # fmt: skip
    model.eval()
    found = mode_gap_probe(model, torch.randn(8, 4), {"1": model[1]})
    assert found.layers == {}  # no running statistics to compare with
    assert found.mode_gap == 0.0  # without running statistics BN normalizes alike
    assert not any(m.training for m in model.modules())


def test_probe_forwards_are_neither_recorded_nor_counted_by_the_watcher():
    torch.manual_seed(0)
    model = probe_model()
    w = Watcher(model)
    x = torch.randn(8, 4)
    F.cross_entropy(model(x), torch.randint(0, 3, (8,))).backward()
    w.log(1)
    with w.paused():
        found = mode_gap_probe(model, torch.randn(6, 4), {n: la.module for n, la in
                                                         w.layers.items()})  # fmt: skip
    assert set(found.layers) == {"1", "5", "7"}
    model(x).sum().backward()
    w.log(2)
    rec = w.flush()
    r = rows_of(rec, "1")
    np.testing.assert_array_equal(r["forwards"], [1, 1])
    np.testing.assert_array_equal(r["batch_n"], [8, 8])  # not the probe's 6
    w.close()


def test_engine_records_eval_gaps_per_block_with_the_same_mode_gap():
    from bncore.run.engine import Trainer
    from tests.helpers import small_config

    cfg = small_config(steps=4, eval_interval=2)
    plain, gaps = Trainer(cfg), Trainer(cfg.model_copy(update={"eval_gaps": True}))
    for t in (plain, gaps):
        for _ in range(3):
            t.step()
    a, b = plain.evaluate(), gaps.evaluate()
    assert a["mode_gap"] == b["mode_gap"] and a["mode_gap"] > 0
    model, probe = plain.model, plain.probe_batch  # the numbers of before: the same
    with torch.no_grad():
        model.eval()
        eval_logits = model(probe)
        saved = [t.clone() for t in model.buffers()]
        model.train()
        train_logits = model(probe)
        for t, kept in zip(model.buffers(), saved, strict=True):
            t.copy_(kept)
    assert a["mode_gap"] == float((train_logits - eval_logits).norm() / eval_logits.norm())
    assert not plain.flush().layer_evals
    le = gaps.flush().layer_evals
    assert list(le["layer"]) == list(gaps.norms) and (le["step"] == 3).all()
    # by hand, for the first block: its eval-mode input is the first layer's output
    first_name, first = next(iter(gaps.norms.items()))
    block = dict(gaps.model.blocks())[first_name]
    gaps.model.eval()
    with torch.no_grad():
        seen = []
        handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        gaps.model(gaps.probe_batch)
        handle.remove()
    gaps.model.train()
    expected = _gaps_by_hand(first, seen[0].reshape(len(seen[0]), first.num_features, -1)
                             .transpose(1, 2).reshape(-1, first.num_features))  # fmt: skip
    assert block is not None
    assert le["eval_mean_gap"][0] == pytest.approx(expected[0], rel=1e-5)
    assert le["eval_var_gap"][0] == pytest.approx(expected[1], rel=1e-4)


def test_evaluations_of_different_columns_are_posted_apart_and_concat_keeps_every_column():
    from bncore.record.sinks import alike_evaluations
    from bncore.record.tables import Records

    def evals(step: int, **cols: float) -> Records:
        return Records(evals={"step": np.asarray([step]),
                              **{k: np.asarray([v]) for k, v in cols.items()}})  # fmt: skip

    steps_only = Records(steps={"step": np.asarray([2]), "loss": np.asarray([1.0])})
    batch = [evals(1, mode_gap=0.1), steps_only, evals(2, mode_gap=0.2),
             evals(2, test_acc=0.5), evals(3, test_acc=0.7)]  # fmt: skip
    runs = alike_evaluations(batch)
    assert [len(r) for r in runs] == [3, 2]  # a table without evaluations joins either
    assert all(r is b for r, b in zip([x for run in runs for x in run], batch, strict=True))
    joined = Records.concat(batch[2:4]).evals  # joined anyway: NaN where a column is missing
    np.testing.assert_array_equal(joined["step"], [2, 2])
    np.testing.assert_array_equal(joined["mode_gap"], [0.2, np.nan])
    np.testing.assert_array_equal(joined["test_acc"], [np.nan, 0.5])

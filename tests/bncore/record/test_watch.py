"""bncore.record.watcher on the networks people train: the model is left as it is, trains bit
for bit as unwatched, and every batch norm in it is recorded, whatever its form."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncore
from bncore.diagnose import diagnose
from bncore.record.sinks import ParquetSink, read_parquet
from bncore.record.tables import Records, channel_widths
from bncore.record.watcher import Watcher
from tests.helpers import batches, bn_inputs, train, trains_exactly_as_unwatched
from tests.third_party import torchvision_models

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]
STEPS = 20


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_models_train_exactly_as_unwatched_and_record_every_bn(arch, layout):
    models = torchvision_models()

    def make() -> nn.Module:
        model = getattr(models, arch)(num_classes=10)
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        return model

    data = batches(STEPS, n=4 if arch in ("resnet50", "densenet121") else 8)
    rec, meta = trains_exactly_as_unwatched(make, data, channels_last=layout == "channels_last")
    # the BN doctor: these batches of 4-8 examples are too small. Two more are true here: at
    # 4, ResNet-50's noisy gamma/beta steps leave 15-18% of layer2's channels dead (for 20+ of
    # 80 steps); on 32x32 images MobileNetV3's features.10 works at 1x1, where a hardswish that
    # is off for all 8 examples leaves a channel constant (variance 4e-11)
    found = {d.rule for d in diagnose(rec, meta).diagnoses if d.severity != "info"}
    also = {"resnet50": {"dead-channels"}, "mobilenet_v3_small": {"constant-channel"}}
    assert found == {"small-batch"} | also.get(arch, set()), found


def test_float64_resnet18_equals_unwatched_and_unwatch_leaves_nothing():
    models = torchvision_models()
    torch.manual_seed(0)
    plain = models.resnet18(num_classes=10).double()
    watched = copy.deepcopy(plain)
    data = batches(STEPS, dtype=torch.float64)
    expected, _ = train(plain, data, watch=False)
    got, w = train(watched, data, watch=True)
    assert got == expected
    w.close()
    assert F.batch_norm is bncore.record.watcher._ORIGINAL
    for m in watched.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_optimizer_made_before_watch_trains_gamma_and_beta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w = Watcher(model)
    for x, y in batches(5, n=16, shape=(8,), classes=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        w.log(1)
    assert not torch.equal(model[1].weight, torch.ones(16))
    assert not torch.equal(model[1].bias, torch.zeros(16))
    w.close()


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's shape: BN and its activation in one module, with a forward of its own."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)  # fmt: skip
        return self.act(x)


class FunctionalBN(nn.Module):
    """Not a BN class at all: a module that calls F.batch_norm with its own state."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))
        self.shift = nn.Parameter(torch.zeros(c))
        self.register_buffer("mu", torch.zeros(c))
        self.register_buffer("sigma2", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mu, self.sigma2, self.scale, self.shift, self.training)


def zoo() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.LazyBatchNorm2d(),
        nn.Tanh(),
        nn.Conv2d(12, 16, 3, padding=1),
        FunctionalBN(16),
        nn.Sigmoid(),
        nn.Conv2d(16, 6, 1),
        nn.SyncBatchNorm(6),
        nn.Conv2d(6, 5, 1),
        bncore.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 10),
    )


def test_every_form_of_bn_is_recorded_with_its_neighbours():
    torch.manual_seed(0)
    plain = zoo()
    plain(torch.randn(2, 3, 8, 8))  # materialize the lazy layer
    watched = copy.deepcopy(plain)
    data = batches(6, n=8, shape=(3, 8, 8))
    expected, _ = train(plain, data, watch=False)
    got, w = train(watched, data, watch=True, channel_interval=1, measure_interval=1)
    assert got == pytest.approx(expected, rel=1e-6)  # bncore's own layer: its own kernel
    assert list(w.layers) == ["1", "3", "6", "9", "11"]  # execution order, module paths
    assert "sync_batch_norm" in w.notes
    rec = w.flush()
    last = {n: i for i, n in enumerate(rec.layers["layer"])}  # each layer's last row
    col = {k: {n: rec.layers[k][i] for n, i in last.items()} for k in rec.layers}
    for name in ("1", "3", "6", "11"):  # activations found in execution order
        assert np.isfinite(col["act_var"][name]), name
    assert col["act_dead"]["1"] >= 0 and np.isfinite(col["act_saturated"]["3"])  # relu, tanh
    assert math.isnan(col["act_var"]["9"]) and "9" in w.notes["act"]  # a conv follows
    for name in w.layers:  # every one is fed by a conv: its weight's norms
        assert col["weight_norm"][name] > 0 and col["weight_grad_norm"][name] > 0, name
    conv = watched[2]
    assert col["weight_norm"]["3"] == pytest.approx(conv.weight.norm().item(), rel=1e-5)
    assert col["weight_grad_norm"]["3"] == pytest.approx(conv.weight.grad.norm().item(), rel=1e-5)
    assert channel_widths(rec.channels).tolist()[-5:] == [8, 12, 16, 6, 5]
    w.close()


def test_gradient_accumulation_records_every_micro_batch_and_the_stepped_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = Watcher(model, channel_interval=1)
    seen, _ = bn_inputs(model)
    means, variances = [], []
    for x, y in batches(3, n=16, shape=(8,), classes=3):
        F.cross_entropy(model(x), y).backward()  # accumulates into .grad
        means.append(seen["1"][0])
        variances.append(seen["1"][1])
    w.log(1)
    gamma_grad = model[1].weight.grad.clone()
    opt.step()
    rec = w.flush()
    np.testing.assert_allclose(rec.channels["pre_mean"][0], torch.stack(means).mean(0), rtol=1e-5)
    np.testing.assert_allclose(rec.channels["pre_var"][0], torch.stack(variances).mean(0),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(rec.channels["gamma_grad"][0], gamma_grad, rtol=1e-6)
    assert rec.layers["gamma_grad_norm"][0] == pytest.approx(gamma_grad.norm().item(), rel=1e-5)
    w.close()


def test_eval_inference_and_frozen_bn_are_not_recorded_and_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(4, 3, 6, 6)
    model.train()
    model(x)
    model.eval()
    before = model(x)
    w = Watcher(model)
    assert torch.equal(model(x), before)
    model.train()
    for m in model.modules():  # the usual "freeze BN" idiom still finds the layer
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model(x)
    assert not w.layers
    w.close()


def test_compile_before_and_after_watch():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    base = make()
    data = batches(3, n=4, shape=(3, 6, 6), classes=3)
    expected, _ = train(copy.deepcopy(base), data, watch=False)
    compiled_first = torch.compile(copy.deepcopy(base))
    got, w = train(compiled_first, data, watch=True)
    assert got == pytest.approx(expected, rel=1e-5) and list(w.layers) == ["_orig_mod.1"]
    w.close()
    model = copy.deepcopy(base)
    w2 = Watcher(model)
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(3)
    losses = []
    for step, (x, y) in enumerate(data, 1):
        loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        w2.log(step)
    assert losses == pytest.approx(expected, rel=1e-5) and list(w2.layers) == ["1"]
    assert np.isfinite(w2.flush().layers["pre_var"]).all()
    w2.close()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_a_compiled_watched_model_trains_as_the_compiled_unwatched_one(arch):
    """torch.compile of a watched model: one graph, no break at each BN (which made dynamo
    compile every module frame once per BN width, past its recompile limit), the very numbers
    of the compiled unwatched model, bit for bit, and every BN recorded with its gradients.
    MobileNetV3 has 11 BN widths. aot_eager runs the same graphs as inductor without its C++
    codegen (minutes here); benchmarks/compile_watch.py runs inductor on every model of
    TORCHVISION (and these two tests' check on all five took 4 minutes)."""
    models = torchvision_models()
    torch.manual_seed(0)
    base = getattr(models, arch)(num_classes=10)
    data = batches(2, n=4)

    def fit(model: nn.Module, watch: bool) -> tuple[list[float], Watcher | None]:
        w = Watcher(model, channel_interval=1, measure_interval=1) if watch else None
        compiled = torch.compile(model, backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        torch.manual_seed(5)  # the same dropout masks
        losses = []
        for step, (x, y) in enumerate(data, 1):
            loss = F.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if w is not None:
                w.log(step)
        return losses, w

    plain, watched = copy.deepcopy(base), copy.deepcopy(base)
    torch._dynamo.reset()
    expected, _ = fit(plain, watch=False)
    torch._dynamo.utils.counters.clear()
    got, w = fit(watched, watch=True)
    assert got == expected  # bit for bit
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # running statistics too
    assert not torch._dynamo.utils.counters["graph_break"]
    assert w is not None
    rec = w.flush()
    bn = [n for n, m in watched.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(w.layers) == sorted(bn)
    for col in ("pre_var", "running_var", "gamma_grad_norm", "grad_out_norm", "grad_in_norm"):
        assert np.isfinite(rec.layers[col]).all(), col
    assert (rec.layers["forwards"] == 1).all() and (rec.layers["backwards"] == 1).all()
    w.close()
    torch._dynamo.reset()


def test_torch_func_on_a_watched_model_is_torch_nn():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 5)

    def grads(m: nn.Module):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = {k: v.clone() for k, v in m.named_buffers()}
        loss = lambda p, b: functional_call(m, (p, b), (x,)).square().sum()  # noqa: E731
        return grad(loss)(params, buffers), buffers

    expected, eb = grads(copy.deepcopy(model))
    watched = copy.deepcopy(model)
    w = Watcher(watched)
    got, gb = grads(watched)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    for k in eb:
        assert torch.equal(gb[k], eb[k]), k
    plain = torch.func.replace_all_batch_norm_modules_(copy.deepcopy(model))
    torch.func.replace_all_batch_norm_modules_(watched)
    xs = torch.randn(3, 8, 5)
    p = {k: v.detach() for k, v in plain.named_parameters()}
    ref = vmap(lambda x: functional_call(plain, p, (x,)))(xs)
    assert torch.equal(vmap(lambda x: functional_call(watched, p, (x,)))(xs), ref)
    w.close()


def test_autocast_bfloat16_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 3))  # fmt: skip
    watched = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        w = Watcher(watched)
        got = watched(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    got.float().sum().backward()
    w.log(1)
    rec = w.flush()
    assert (
        np.isfinite(rec.layers["pre_var"]).all() and np.isfinite(rec.layers["grad_in_norm"]).all()
    )
    w.close()


def test_fuse_modules_for_inference_on_a_watched_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(4, 3, 6, 6))
    w = Watcher(model)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fused = torch.ao.quantization.fuse_modules(model, [["0", "1", "2"]])
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)
    w.close()


def test_bncore_layers_are_torch_batch_norm_layers_to_torch_tools():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), bncore.BatchNorm2d(4))
    assert isinstance(m[1], nn.modules.batchnorm._BatchNorm)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))
    assert type(synced[1]) is nn.SyncBatchNorm
    assert torch.equal(synced[1].running_var, m[1].running_var)
    torch.func.replace_all_batch_norm_modules_(m)
    assert m[1].running_mean is None and not m[1].track_running_stats
    m.eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(
        m(x), F.batch_norm(m[0](x), None, None, m[1].weight, m[1].bias, True)
    )


def test_ragged_channel_records_survive_concat_and_parquet(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 7), nn.BatchNorm1d(7))
    w = Watcher(model, channel_interval=1)
    parts = []
    for step, (x, _) in enumerate(batches(3, n=5, shape=(4,)), 1):
        model(x).sum().backward()
        w.log(step)
        parts.append(w.flush())
    rec = Records.concat(parts)
    assert channel_widths(rec.channels).tolist() == [3, 7] * 3
    sink = ParquetSink(tmp_path)
    sink.start({})
    for p in parts:
        sink.write(p)
    sink.finish({})
    back = read_parquet(tmp_path)
    for a, b in zip(back.channels["pre_var"], rec.channels["pre_var"], strict=True):
        np.testing.assert_array_equal(a, b)
    w.close()


def test_watch_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        Watcher(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channel_interval"):
        Watcher(nn.BatchNorm1d(3), channel_interval=0)


def test_measured_statistics_follow_their_interval_and_the_free_ones_every_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    w = Watcher(model, measure_interval=3)
    for step, (x, _) in enumerate(batches(7, n=8, shape=(4,)), 1):
        model(x).sum().backward()
        w.log(step)
    rec = w.flush()
    measured = [i % 3 == 0 for i in range(7)]
    for col in ("grad_out_norm", "grad_in_norm", "weight_norm", "weight_grad_norm"):
        assert np.isfinite(rec.layers[col]).tolist() == measured, col
    # the activation is found during the first forward, and measured from the next on
    assert np.isfinite(rec.layers["act_var"]).tolist() == [False, *measured[1:]]
    for col in ("pre_var", "running_var", "gamma", "gamma_grad_norm", "beta_grad_norm"):
        assert np.isfinite(rec.layers[col]).all(), col
    w.close()


def test_a_model_moved_after_watch_is_still_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    w = Watcher(model)
    model.to(torch.float64)  # new buffer tensors (and Parameter data) after watch()
    model(torch.randn(8, 4, dtype=torch.float64)).sum().backward()
    w.log(1)
    assert list(w.layers) == ["1"] and np.isfinite(w.flush().layers["pre_var"]).all()
    w.close()


def test_a_model_without_batch_norm_says_so_and_trains_as_before():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    w = Watcher(model)
    with pytest.warns(UserWarning, match="without any batch norm"):
        model(torch.randn(3, 4)).sum().backward()
    w.log(1)
    assert not w.layers and "bn" in w.notes and not w.flush().layers
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    w.close()

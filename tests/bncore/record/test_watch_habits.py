"""bncore.record.watcher under what users do that torch allows: a BN with neither parameters nor
buffers, an empty batch, inference mode in train mode, TorchScript and tracing, frozen BN. Each
runs as torch runs it, watched or not, and what is a batch norm is recorded or listed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bncore.record.watcher import Watcher
from tests.third_party import torchvision_models


def mlp(**bn: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, **bn), nn.ReLU(), nn.Linear(8, 3))


def step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    loss = F.cross_entropy(model(x), torch.arange(len(x)) % 3)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_a_bn_without_parameters_or_buffers_is_recorded():
    """affine=False, track_running_stats=False (MAML-style nets, GAN discriminators): found by
    running, recorded exactly, trained bit for bit as unwatched."""
    plain = mlp(affine=False, track_running_stats=False)
    watched = copy.deepcopy(plain)
    w = Watcher(watched)
    seen = []
    watched[1].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    xs = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, watched)]
    for i, x in enumerate(xs, 1):
        assert step(watched, x, opts[1]) == step(plain, x, opts[0])
        w.log(i)
    assert list(w.layers) == ["1"] and "bn" not in w.notes
    rec = w.flush()
    var = torch.stack([h.var(0, unbiased=False).mean() for h in seen]).numpy()
    assert rec.layers["pre_var"] == pytest.approx(var, rel=1e-5)
    assert w.meta()["layer_config"]["1"]["affine"] is False
    w.close()
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in watched] == [0, 1, 0, 0]


def test_an_empty_batch_adds_nothing():
    """A forward of 0 examples (the last batch of a filtered loader) in a logged step: torch's
    result, and the step's record is that of the real batch alone."""
    plain, watched = mlp(), mlp()
    w = Watcher(watched)
    x, empty = torch.randn(16, 4), torch.randn(0, 4)
    for m in (plain, watched):
        assert m(empty).shape == (0, 3)
        m(x).sum().backward()
    w.log(1)
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    rec = w.flush()
    with torch.no_grad():
        h = watched[0](x)
    assert rec.layers["pre_var"][0] == pytest.approx(h.var(0, unbiased=False).mean().item(), 1e-5)
    assert rec.layers["pre_mean"][0] == pytest.approx(h.mean(0).mean().item(), abs=1e-6)
    assert rec.layers["batch_n"][0] == 16 and rec.layers["forwards"][0] == 1
    w.close()


def test_inference_mode_on_a_watched_model_in_train_mode_runs_as_torch_does():
    plain, watched = mlp(), mlp()
    w = Watcher(watched)
    x = torch.randn(16, 4)
    with torch.inference_mode():
        assert torch.equal(watched(x), plain(x))
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the running statistics moved as torch moves them
    watched(x).sum().backward()  # training goes on, recorded
    w.log(1)
    assert w.flush().layers["forwards"].tolist() == [1.0]
    w.close()


def test_torchscript_and_tracing_work_as_without_bn_scope():
    """Scripting any other model with BN while a watcher is attached, and any after, as torch
    does; a watched model traced in train mode too (what tracing runs is not recorded)."""
    x = torch.randn(16, 4)
    watched = mlp()
    w = Watcher(watched)
    other = mlp()
    scripted = torch.jit.script(other)
    assert torch.equal(scripted(x), mlp()(x))
    traced = torch.jit.trace(watched, x, check_trace=False)
    assert torch.equal(traced(x), mlp()(x)) and not w.layers
    watched(x).sum().backward()
    w.log(1)
    assert list(w.layers) == ["1"]  # eager training is still recorded
    w.close()
    assert torch.equal(torch.jit.script(mlp())(x), mlp()(x))  # and after unwatch
    # the watched model itself once unwatched (while watched its hooks, Python, are in the
    # way, as any Python forward hook is)
    assert torch.equal(torch.jit.script(watched)(x), watched(x))


def test_frozen_bn_is_listed_with_its_fixed_statistics():
    """FrozenBatchNorm2d (detection backbones, timm's freeze_batch_norm_2d) computes no batch
    statistics: listed as frozen, its fixed statistics kept once, beside real BN or alone."""
    torchvision_models()  # the test-only import shim
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    with torch.no_grad():
        frozen.running_var.fill_(4.0)
        frozen.weight.fill_(2.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU())  # fmt: skip
    w = Watcher(model)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    w.log(1)
    meta = w.meta()
    assert list(w.layers) == ["4"] and meta["bn_modules"] == ["1", "4"]
    fixed = meta["frozen_bn"]["1"]
    assert fixed["class"] == "FrozenBatchNorm2d" and fixed["channels"] == 4
    assert fixed["running_var"] == 4.0 and fixed["gamma"] == 2.0 and fixed["beta"] == 0.0
    assert fixed["scale_min"] == pytest.approx(2.0 / (4.0 + fixed["eps"]) ** 0.5)
    assert "frozen_bn" in w.notes
    w.close()
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU())
    w = Watcher(backbone)
    with pytest.warns(UserWarning, match="only 1 frozen batch norm layers"):
        backbone(torch.randn(2, 3, 8, 8)).sum().backward()
    assert list(w.meta()["frozen_bn"]) == ["1"] and "frozen_bn" in w.notes
    w.close()

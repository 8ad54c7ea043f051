"""Residual networks from a config: He et al.'s CIFAR ResNets with the options the literature
compares, exact to torch.nn with BN swapped in, recorded at every unit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bncore
from bncore.run.config import ConfigError, parse_config
from bncore.run.engine import Trainer, train
from bncore.run.models import ResNet, build_model

DIGITS = (1, 8, 8)


def _cfg(**model: object) -> dict:
    return {
        "model": {"kind": "resnet", "depth": 1, "width": 8, **model},
        "data": {"name": "digits"},
    }


def _resnet(norm: str = "batch", **model: object) -> ResNet:
    torch.manual_seed(0)
    cfg = parse_config({**_cfg(**model), "norm": {"kind": norm}})
    net = build_model(cfg, DIGITS, 10)
    assert isinstance(net, ResNet)
    return net


def _torch_nn(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with torch.nn's BatchNorm2d in place of bncore's, same state."""
    ref = copy.deepcopy(net)
    for module in list(ref.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bncore.BatchNorm2d):
                swap = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
                swap.load_state_dict(child.state_dict())
                setattr(module, child_name, swap)
    return ref


@pytest.mark.parametrize("shortcut", ["zero_pad", "projection"])
@pytest.mark.parametrize("residual", ["post", "pre"])
def test_resnet_6n_plus_2_layout(residual, shortcut):
    net = _resnet(depth=2, residual=residual, shortcut=shortcut)
    names = [n for n, _ in net.blocks()]
    # a stem, 3 stages x 2 residual blocks of two units, and (pre-activation) a final norm-ReLU;
    # projection shortcuts: a unit of their own at the two stage transitions
    projected = 2 * (shortcut == "projection")
    assert names[:3] == ["stem", "res0.a", "res0.b"]
    assert len(names) == 1 + 12 + (residual == "pre") + projected
    assert [n for n in names if n.endswith(".shortcut")] == ["res2.shortcut", "res4.shortcut"][
        :projected
    ]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 6 * 2 + 2 + projected  # ResNet-(6n+2): 6n + 1 convs, the classifier
    assert [r.a.layer.out_channels for _, r in net.residual_blocks()] == [8, 8, 16, 16, 32, 32]
    assert net(torch.randn(4, *DIGITS)).shape == (4, 10)


@pytest.mark.parametrize("shortcut", ["zero_pad", "projection"])
@pytest.mark.parametrize("residual", ["post", "pre"])
def test_resnet_is_exact_to_torch_nn_forward_backward_and_running_stats(residual, shortcut):
    net = _resnet(depth=1, residual=residual, shortcut=shortcut)
    ref = _torch_nn(net)
    x = torch.randn(16, *DIGITS)
    y, y_ref = net(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), (_, c) in zip(net.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


def test_zero_init_residual_and_skip_init_start_every_block_as_the_identity():
    x = torch.randn(8, *DIGITS)
    for net in (
        _resnet(zero_init_residual=True),
        _resnet(zero_init_residual=True, residual="pre"),
        _resnet("none", skip_init=True),
    ):
        with torch.no_grad():
            h = net.stem(x)
            for _, r in net.residual_blocks():
                torch.testing.assert_close(r(h), r.shortcut(h))
                h = r(h)
    plain = _resnet()
    with torch.no_grad():
        h = plain.stem(x)
        _, first = plain.residual_blocks()[0]
        assert (first(h) - first.shortcut(h)).abs().max() > 0.1  # a live branch otherwise
    gain = _resnet("none", skip_init=True).residual_blocks()[0][1].skip_gain
    assert gain is not None and gain.requires_grad and float(gain.detach()) == 0.0


@pytest.mark.parametrize("residual", ["post", "pre"])
def test_at_a_transition_zero_padding_halves_the_variance_and_a_projection_resets_it(residual):
    """He et al.'s option A averages the stream with as many zero channels: its average channel
    variance halves. A projection (1x1 conv and its norm, Brock et al.'s networks) starts the
    next stage at about unit variance, whatever the stream's variance was."""
    x = 5 * torch.randn(64, 8, 8, 8)  # a stream of variance 25 entering stage 2
    with torch.no_grad():
        _, padded = _resnet(residual=residual).residual_blocks()[1]
        _, projected = _resnet(residual=residual, shortcut="projection").residual_blocks()[1]
        assert padded.a.layer.stride == projected.a.layer.stride == (2, 2)

        def var(t: torch.Tensor) -> float:
            return float(t.var([0, 2, 3], correction=0).mean())

        kept = x[:, :, ::2, ::2]
        assert var(padded.shortcut(x)) == pytest.approx(var(kept) / 2, rel=1e-6)
        assert 0.4 < var(projected.shortcut(x)) < 2.5  # reset: 25 in, about 1 out
    with pytest.raises(ConfigError, match=r"model\.shortcut.*model\.kind must be 'resnet'"):
        parse_config({"model": {"kind": "cnn", "shortcut": "projection"},
                      "data": {"name": "digits"}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.shortcut"):
        parse_config(_cfg(shortcut="conv"))


@pytest.mark.parametrize(("norm", "cls"), [("group", nn.GroupNorm), ("layer", nn.GroupNorm),
                                           ("none", nn.Identity)])  # fmt: skip
def test_other_normalizations_take_the_same_positions(norm, cls):
    net = _resnet(norm)
    with_bn = _resnet()
    assert [n for n, _ in net.blocks()] == [n for n, _ in with_bn.blocks()]
    _, r = net.residual_blocks()[0]
    assert isinstance(r.a.norm, cls)
    if norm == "layer":
        assert r.a.norm.num_groups == 1


@pytest.mark.parametrize(("residual", "shortcut"), [("post", "zero_pad"), ("pre", "zero_pad"),
                                                   ("pre", "projection")])  # fmt: skip
def test_every_unit_is_recorded_as_its_normalization_sees_it(residual, shortcut):
    """The recorded batch statistics at each unit (a projection shortcut's too) equal those of
    what enters its norm."""
    cfg = parse_config({**_cfg(residual=residual, shortcut=shortcut), "steps": 1,
                        "batch_size": 32})  # fmt: skip
    t = Trainer(cfg)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        b.norm.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].detach()))
        for name, b in t.model.blocks()
    ]
    t.step()
    for h in hooks:
        h.remove()
    rec = t.flush().layers
    assert list(rec["layer"]) == [n for n, _ in t.model.blocks()]
    for i, name in enumerate(rec["layer"]):
        var, mean = torch.var_mean(seen[name], [0, 2, 3], correction=0)
        np.testing.assert_allclose(rec["pre_mean"][i], float(mean.mean()), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec["pre_var"][i], float(var.mean()), rtol=1e-4, atol=1e-6)
    assert np.isfinite(rec["weight_grad_norm"]).all()


@pytest.mark.parametrize("over", [{"residual": "pre"}, {"skip_init": True}, {}])
def test_resnets_train_on_digits(over):
    cfg = parse_config({**_cfg(**over), "steps": 80, "eval_interval": 80, "batch_size": 64})
    result = train(cfg)
    assert result.status == "completed" and result.final["test_acc"] > 0.5


def test_resnet_1d_on_mnist1d_and_config_errors():
    cfg = parse_config({**_cfg(), "data": {"name": "mnist1d", "samples": 400}})
    net = build_model(cfg, (1, 40), 10)
    assert net(torch.randn(3, 1, 40)).shape == (3, 10)
    with pytest.raises(ConfigError, match=r"model\.kind='resnet' needs data with spatial"):
        parse_config({**_cfg(), "data": {"name": "blobs"}})
    with pytest.raises(ConfigError, match="parameters"):
        parse_config({**_cfg(depth=100, width=256)})

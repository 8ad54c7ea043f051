"""Networks from a config: the same named positions with and without normalization."""

from __future__ import annotations

import torch
from torch import nn

import bncore
from bncore.run.config import parse_config
from bncore.run.models import build_model


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_children()]


def test_same_positions_with_and_without_bn():
    with_bn = build_model(parse_config({"model": {"depth": 3}}), (40,), 10)
    without = build_model(
        parse_config({"model": {"depth": 3}, "norm": {"kind": "none"}}), (40,), 10
    )
    assert _names(with_bn) == _names(without) == ["block0", "block1", "block2", "head"]
    assert isinstance(with_bn.block1.norm, bncore.BatchNorm1d)
    assert isinstance(without.block1.norm, nn.Identity)


def test_bias_default_follows_placement():
    before = build_model(parse_config({}), (40,), 10)
    after = build_model(parse_config({"norm": {"placement": "after_activation"}}), (40,), 10)
    plain = build_model(parse_config({"norm": {"kind": "none"}}), (40,), 10)
    forced = build_model(parse_config({"model": {"bias": True}}), (40,), 10)
    assert before.block0.layer.bias is None  # BN's mean subtraction would cancel it
    assert after.block0.layer.bias is not None and plain.block0.layer.bias is not None
    assert forced.block0.layer.bias is not None


def test_placement_order():
    cfg = parse_config(
        {"model": {"depth": 1, "activation": "relu"}, "norm": {"placement": "after_activation"}}
    )
    model = build_model(cfg, (4,), 2).train()
    seen = {}

    class Spy:
        def observe(self, block, pre_norm, post_norm, pre_act, post_act):
            seen.update(pre_norm=pre_norm, post_norm=post_norm, pre_act=pre_act, post_act=post_act)

    model.block0.probe = Spy()
    model(torch.randn(8, 4))
    assert seen["pre_norm"] is seen["post_act"]  # the activation feeds BN
    assert (seen["pre_norm"] >= 0).all() and (seen["pre_act"] < 0).any()


def test_cnn_1d_and_2d():
    cnn1 = build_model(
        parse_config({"model": {"kind": "cnn", "depth": 4, "width": 8}}), (1, 40), 10
    )
    assert isinstance(cnn1.block0.layer, nn.Conv1d)
    assert cnn1(torch.randn(5, 1, 40)).shape == (5, 10)
    cfg = parse_config(
        {"model": {"kind": "cnn", "depth": 3, "width": 6}, "data": {"name": "digits"}}
    )
    cnn2 = build_model(cfg, (1, 8, 8), 10)
    assert isinstance(cnn2.block2.norm, bncore.BatchNorm2d)
    assert cnn2(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert cnn2.block1.layer.stride == (2, 2)


def test_keras_convention_layers():
    model = build_model(parse_config({"norm": {"convention": "keras"}}), (40,), 10)
    bn = model.block0.norm
    assert not bn.unbiased_running_var and bn.eps == 1e-3
    assert abs(bn.momentum - 0.01) < 1e-12

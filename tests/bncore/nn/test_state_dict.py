"""state_dicts move between torch.nn's BatchNorm and bncore's, both ways, with the same names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bncore

KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _trained(layer: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(4):
        loss = layer(torch.randn(shape, generator=gen) * 2 + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.eval()


@pytest.mark.parametrize(
    "pair,shape",
    [
        ((nn.BatchNorm1d, bncore.BatchNorm1d), (8, 4)),
        ((nn.BatchNorm2d, bncore.BatchNorm2d), (4, 4, 3, 3)),
        ((nn.BatchNorm3d, bncore.BatchNorm3d), (2, 4, 2, 3, 3)),
    ],
)
@pytest.mark.parametrize("direction", ["torch_to_bncore", "bncore_to_torch"])
def test_round_trip(pair, shape, direction):
    torch_cls, our_cls = pair
    src_cls, dst_cls = (
        (torch_cls, our_cls) if direction == "torch_to_bncore" else (our_cls, torch_cls)
    )
    src = _trained(src_cls(4), shape)
    sd = src.state_dict()
    assert list(sd) == KEYS
    dst = dst_cls(4).eval()
    dst.load_state_dict(sd, strict=True)
    x = torch.randn(shape)
    torch.testing.assert_close(dst(x), src(x))
    for k in KEYS:
        assert torch.equal(dst.state_dict()[k], sd[k]), k
    # and back again, through a file
    back = src_cls(4).eval()
    back.load_state_dict(dst.state_dict())
    torch.testing.assert_close(back(x), src(x))


def test_model_with_bn_layers_swaps_both_ways(tmp_path):
    def model(bn):
        return nn.Sequential(
            nn.Conv2d(3, 5, 3, bias=False),
            bn(5),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * 4 * 4, 2, bias=False),
            nn.BatchNorm1d(2),
        )

    torch.manual_seed(0)
    ref = _trained(model(nn.BatchNorm2d), (6, 3, 6, 6))
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    ours = model(bncore.BatchNorm2d).eval()
    ours.load_state_dict(torch.load(tmp_path / "ref.pt"))
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(ours(x), ref(x))


def test_old_state_dict_without_num_batches_tracked():
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    layer = bncore.BatchNorm1d(3)
    layer.load_state_dict(sd)
    assert int(layer.num_batches_tracked) == 0


def test_mismatched_state_dict_fails_clearly():
    with pytest.raises(RuntimeError, match="size mismatch"):
        bncore.BatchNorm1d(3).load_state_dict(nn.BatchNorm1d(4).state_dict())


def test_repr_matches_torch():
    for kw in [{}, {"momentum": None, "affine": False}, {"bias": False, "eps": 1e-3}]:
        assert repr(bncore.BatchNorm2d(7, **kw)) == repr(nn.BatchNorm2d(7, **kw))

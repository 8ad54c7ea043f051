"""Bad inputs get errors that say what is wrong and what was expected."""

from __future__ import annotations

import pytest
import torch

import bncore
from bncore.nn.functional import batch_norm


@pytest.mark.parametrize(
    "layer,shape,expected",
    [
        (
            bncore.BatchNorm1d,
            (4, 3, 2, 2),
            r"expected 2D \(N, C\) or 3D \(N, C, L\) input \(got 4D",
        ),
        (bncore.BatchNorm1d, (3,), r"expected 2D .* \(got 1D"),
        (bncore.BatchNorm2d, (4, 3), r"expected 4D \(N, C, H, W\) input \(got 2D"),
        (bncore.BatchNorm3d, (4, 3, 2, 2), r"expected 5D \(N, C, D, H, W\) input \(got 4D"),
    ],
)
def test_wrong_rank(layer, shape, expected):
    with pytest.raises(ValueError, match=expected):
        layer(3)(torch.randn(shape))


@pytest.mark.parametrize("kwargs", [{}, {"affine": False, "track_running_stats": False}])
def test_channel_mismatch(kwargs):
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\) got input with 5 channels"):
        bncore.BatchNorm2d(3, **kwargs)(torch.randn(2, 5, 4, 4))


def test_one_value_per_channel_in_training(kernel: str):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bncore.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bncore.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    bncore.BatchNorm1d(3).eval()(torch.randn(1, 3))  # fine in eval mode


def test_functional_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        batch_norm(torch.randn(4), None, None, training=True)
    with pytest.raises(ValueError, match=r"running_mean should contain 3 elements .* not 4"):
        batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="weight should contain 3 elements"):
        batch_norm(x, None, None, torch.ones(2), training=True)
    with pytest.raises(ValueError, match="running_mean must be defined in evaluation mode"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="must be given together"):
        batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(TypeError, match="floating-point input"):
        batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)


def test_constructor_errors():
    with pytest.raises(ValueError, match="momentum must lie in"):
        bncore.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="num_features must be positive"):
        bncore.BatchNorm1d(0)
    with pytest.raises(TypeError, match="num_features must be an int"):
        bncore.BatchNorm1d(2.5)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bncore.BatchNorm1d(3, eps=-1)


def test_failed_call_changes_nothing(kernel: str):
    layer = bncore.BatchNorm1d(3)
    layer(torch.randn(8, 3) + 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError):
        layer(torch.randn(8, 4))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k

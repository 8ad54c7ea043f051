"""bncore.record.watcher on third-party models as people build them: timm's (its BatchNormAct2d,
RegNetY, HRNet), Hugging Face transformers' (built from configs), and torchvision's beyond the
classic classifiers (RegNet, whose module names have '-'; a 3D video network; a segmentation
network). Each trains bit for bit as unwatched, is left as it was, and has every batch norm
recorded with the statistics its own forward hooks see (tests/helpers.py
trains_exactly_as_unwatched). Nothing is downloaded: every model is built untrained."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers import batches, one_thread, trains_exactly_as_unwatched
from tests.third_party import timm, torchvision_models, transformers

STEPS = 5  # each model trains twice (watched and not) on 4 examples a step


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """(tests/helpers.py one_thread: why.) Each model's two trainings run alike either way;
    test_watch.py trains torchvision's classifiers on every thread."""
    with one_thread():
        yield


@pytest.mark.parametrize(
    "name, norm",
    [
        ("efficientnet_b0", "BatchNormAct2d"),  # BN and its activation in one module
        ("regnety_002", "BatchNormAct2d"),  # and squeeze-excitation
        ("hrnet_w18_small", "BatchNorm2d"),  # parallel branches fused across resolutions
    ],
)
def test_timm_models_train_exactly_as_unwatched(name, norm):
    make = partial(timm().create_model, name, pretrained=False, num_classes=10)
    kinds = {type(m).__name__ for m in make().modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)}  # fmt: skip
    assert kinds == {norm}
    trains_exactly_as_unwatched(make, batches(STEPS, n=4))


def _logits(out: Any) -> torch.Tensor:
    return out.logits


@pytest.mark.parametrize(
    "name, config",
    [
        ("ResNet", {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]}),
        ("MobileNetV2", {"depth_multiplier": 0.35, "image_size": 32}),
    ],
)
def test_transformers_models_train_exactly_as_unwatched(name, config):
    tf = transformers()
    built = getattr(tf, f"{name}Config")(num_labels=10, **config)
    make = partial(getattr(tf, f"{name}ForImageClassification"), built)
    trains_exactly_as_unwatched(make, batches(STEPS, n=4), output=_logits)


def _segmentation(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return out["out"]  # per-pixel logits


def test_torchvision_regnet_with_dashes_in_its_module_names():
    make = partial(torchvision_models().regnet_x_400mf, num_classes=10)
    assert any("-" in n for n, m in make().named_modules() if isinstance(m, nn.BatchNorm2d))
    trains_exactly_as_unwatched(make, batches(STEPS, n=4))


def test_torchvision_video_network_with_batchnorm3d():
    make = partial(torchvision_models().video.r3d_18, num_classes=10)
    assert any(isinstance(m, nn.BatchNorm3d) for m in make().modules())
    trains_exactly_as_unwatched(make, batches(STEPS, n=4, shape=(3, 2, 16, 16)))


def test_torchvision_segmentation_network():
    segmentation = torchvision_models().segmentation
    make = partial(segmentation.lraspp_mobilenet_v3_large, weights=None, weights_backbone=None,
                   num_classes=3)  # fmt: skip
    data = batches(STEPS, n=4, shape=(3, 32, 32), classes=3, target=(32, 32))
    trains_exactly_as_unwatched(make, data, output=_segmentation)

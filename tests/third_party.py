"""Third-party model libraries for the tests (torchvision, Lightning, timm, transformers),
imported the way this machine allows.

The registry's torchvision wheel is linked against CUDA torch: on the pinned CPU torch, importing
it fails while it registers fake (meta) kernels for its C++ detection operators
(``torchvision::nms`` and friends), which do not exist in this build. The models need none of
them, so the import here lets just those ``torchvision::`` registrations fail. This lives in the
tests only: the product imports no torchvision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch


@contextlib.contextmanager
def _tolerate_missing_torchvision_ops() -> Iterator[None]:
    real = torch.library.register_fake

    def register_fake(op: Any, *args: Any, **kwargs: Any) -> Any:
        name = op if isinstance(op, str) else ""
        if not name.startswith("torchvision::") or args:
            return real(op, *args, **kwargs)

        def decorate(fn: Callable) -> Callable:
            try:
                return real(op, **kwargs)(fn)
            except RuntimeError:  # the operator is not in this build
                return fn

        return decorate

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = real


def torchvision_models() -> ModuleType:
    """``torchvision.models``, or a skip that says why it cannot be had."""
    try:
        with _tolerate_missing_torchvision_ops():
            import torchvision  # noqa: F401
        import torchvision.models as models
    except ImportError as exc:
        pytest.skip(f"torchvision is not installed ({exc}); scripts/test installs it")
    return models


def lightning() -> ModuleType:
    """``lightning`` (which imports torchvision when present), or a skip."""
    with _tolerate_missing_torchvision_ops():
        return pytest.importorskip("lightning", reason="lightning is not installed")


def timm() -> ModuleType:
    """``timm`` (which imports torchvision), or a skip."""
    with _tolerate_missing_torchvision_ops():
        return pytest.importorskip(
            "timm", reason="timm is not installed (the test extra installs it)"
        )


def transformers() -> ModuleType:
    """``transformers`` with its Trainer (which imports torchvision, and needs accelerate),
    or a skip."""
    with _tolerate_missing_torchvision_ops():
        found = pytest.importorskip(
            "transformers", reason="transformers is not installed (the test extra installs it)"
        )
        pytest.importorskip(
            "accelerate", reason="accelerate is not installed: transformers' Trainer needs it"
        )
        found.Trainer  # its lazy import: torchvision, under the shim  # noqa: B018
    return found

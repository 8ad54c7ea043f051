"""Small helpers shared by the tests."""

from __future__ import annotations

import torch


def channel_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel one: what BN reduces over."""
    return [d for d in range(x.dim()) if d != 1]

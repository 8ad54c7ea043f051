"""Small helpers shared by the tests."""

from __future__ import annotations

import socket

import torch


def free_port() -> int:
    """A loopback port nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel one: what BN reduces over."""
    return [d for d in range(x.dim()) if d != 1]

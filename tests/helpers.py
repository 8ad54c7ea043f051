"""Small helpers shared by the tests."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch


def free_port() -> int:
    """A loopback port nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel one: what BN reduces over."""
    return [d for d in range(x.dim()) if d != 1]


def write_cifar(folder: Path, sizes=(("data_batch_1", 20), ("test_batch", 8)), protocol=None):
    """A tiny CIFAR-10 python-version dataset, in the real layout (a pickled dict per batch)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, n in sizes:
        batch = {
            b"batch_label": b"training batch 1 of 5",
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return folder


class Touch:
    """Unpickling this with plain pickle creates ``marker``: the shape of a code-execution
    payload (any callable could stand where ``open`` does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))

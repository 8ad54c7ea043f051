"""Shared fixtures: which kernel runs, and a seeded generator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bncore import kernels
from bncore.kernels import cpu

CPU_KERNELS = ["reference", "cpu"]


@pytest.fixture(params=CPU_KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per CPU kernel, forcing it."""
    name = request.param
    if name == "cpu" and not cpu.available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu.unavailable_reason()}")
    with kernels.use(name):
        yield name


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)

"""Shared fixtures: which kernel runs, a seeded generator, and the databases (a SQLite file,
a real PostgreSQL) the store and server tests run against."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bncore.nn import kernels
from bncore.nn.kernels import cpu
from tests.postgres import Cluster
from tests.postgres import unavailable as postgres_unavailable

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


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A real PostgreSQL cluster on 127.0.0.1 for the whole session (skips where none can run)."""
    why = postgres_unavailable()
    if why:
        pytest.skip(f"PostgreSQL: {why}")
    cluster = Cluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database the module's tests run against: each module that asks runs once per kind."""
    return request.param


@pytest.fixture
def db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """A fresh, empty database of the module's kind: its SQLAlchemy URL."""
    return database_url(request, backend, tmp_path)


def database_url(request: pytest.FixtureRequest, backend: str, directory: Path) -> str:
    """A fresh database: a SQLite file in ``directory``, or a new database in the cluster."""
    if backend == "sqlite":
        return f"sqlite:///{directory / 'runs.db'}"
    return request.getfixturevalue("postgres").database()

"""Fixtures of the server's tests: the service in-process, and its HTTP API over it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_api
from server.service import Service, build
from server.settings import Settings


@pytest.fixture
def service(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """``service(**settings)``: the service (server.service.build) on this test's fresh database
    (of the module's kind: a SQLite file, or a real PostgreSQL), in this process; stopped
    afterwards. Nothing starts its scheduler: a run launched on it stays queued."""
    built: list[Service] = []

    def make(**settings: Any) -> Service:
        svc = build(Settings(data_dir=tmp_path, database_url=db_url, **settings))
        built.append(svc)
        return svc

    yield make
    for svc in built:
        asyncio.run(svc.stop())


@pytest.fixture
def http() -> Callable[[Service], TestClient]:
    """``http(svc)``: the HTTP API (server.app) on ``svc``, in-process, as a plain httpx client
    sees it (redirects not followed). Its lifespan never runs: the scheduler stays stopped."""

    def client(svc: Service) -> TestClient:
        return TestClient(create_api(svc, "http://testserver"), follow_redirects=False)

    return client

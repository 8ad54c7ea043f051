"""Everything the server can be told, in one place: flags of ``bnscope serve`` or ``BNSCOPE_*``
environment variables, with defaults that work on any machine."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_max_runs() -> int:
    """Concurrent runs that fit this machine: one per two cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


class Settings(BaseSettings):
    """Server settings (``BNSCOPE_HOST``, ``BNSCOPE_PORT``, ``BNSCOPE_DATA_DIR``, ...)."""

    model_config = SettingsConfigDict(env_prefix="BNSCOPE_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port)")
    data_dir: Path = Field(Path("bnscope-data"), description="where the database lives")
    data_root: Path | None = Field(
        None,
        description="the only directory runs may read datasets from (data.path: a directory "
        "under it); default: data_dir/datasets",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite in data_dir (PostgreSQL: a URL)"
    )
    token: str | None = Field(None, description="bearer token every mutating call must carry")
    max_runs: int = Field(
        default_factory=default_max_runs,
        ge=1,
        le=64,
        description="runs training at once; the rest wait in the queue",
    )
    worker_threads: int | None = Field(
        None, ge=1, description="torch threads per run; default: cores / max_runs"
    )
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="largest request body")
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins (none)")
    client_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds without a record, status or heartbeat after which a script's run "
        "(bnscope.client) is marked failed",
    )
    public_url: str | None = Field(
        None, description="how workers reach the API; default: http://127.0.0.1:<port>"
    )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'bnscope.db').resolve()}"

    @property
    def dataset_root(self) -> Path:
        """Where runs' ``data.path`` must lead: ``data_root``, or ``data_dir/datasets``."""
        return self.data_root if self.data_root is not None else self.data_dir / "datasets"

    def threads_per_run(self) -> int:
        return self.worker_threads or max(1, (os.cpu_count() or 2) // self.max_runs)

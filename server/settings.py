"""Everything the server can be told, in one place: flags of ``bnscope serve`` or ``BNSCOPE_*``
environment variables, with defaults that work on any machine. The flags are made from the
fields here (bnscope.flags): a new field is a new flag, its help its description and default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 2**30


@dataclass(frozen=True)
class Flag:
    """How a setting is written as a flag of ``bnscope serve`` where its field's name and type do
    not say it (``Annotated[int, Flag(...)]``): ``name``, the flag without its dashes, where it is
    not the field's name (a repeatable flag names one item); ``size``, a number of bytes, given
    as 4GiB, 500MB, ... and shown so."""

    name: str | None = None
    size: bool = False


#: A setting in bytes.
BYTES = Flag(size=True)


def default_max_runs() -> int:
    """Concurrent runs that fit this machine: one per two cores, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


class Settings(BaseSettings):
    """Server settings (``BNSCOPE_HOST``, ``BNSCOPE_PORT``, ``BNSCOPE_DATA_DIR``, ...)."""

    model_config = SettingsConfigDict(env_prefix="BNSCOPE_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0: all of them)")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port)")
    data_dir: Path = Field(
        Path("bnscope-data"), description="where runs are stored (the SQLite database)"
    )
    data_root: Path | None = Field(
        None,
        description="the only directory runs may read datasets from (data.path: a directory "
        "under it); default: data_dir/datasets",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite in data_dir (PostgreSQL: a URL)"
    )
    token: str | None = Field(None, description="bearer token every mutating call must carry")
    protect_reads: bool = Field(
        False,
        description="with a token: every request but /healthz carries it too (the API as a "
        "Bearer header; a browser opens the dashboard once with ?token=..., kept in a cookie)",
    )
    durability: Literal["normal", "full"] = Field(
        "normal",
        description="SQLite: 'normal' (WAL, synchronous=NORMAL) keeps every acknowledged batch "
        "when the server is killed, not when the machine loses power; 'full' (synchronous="
        "FULL) syncs each one to disk before acknowledging it, and survives that too",
    )
    max_runs: int = Field(
        default_factory=default_max_runs,
        ge=1,
        le=64,
        description="runs training at once, one per two cores unless set; the rest wait in "
        "the queue",
    )
    worker_threads: int | None = Field(
        None, ge=1, description="torch threads per run; default: cores / max_runs"
    )
    max_body_bytes: Annotated[int, BYTES] = Field(
        32 * 2**20, ge=1024, description="largest request body"
    )
    max_config_bytes: Annotated[int, BYTES] = Field(
        2**20,
        ge=1024,
        description="largest body of a call other than records (a config, a sweep, a status "
        "with its meta): read and checked in well under a second",
    )
    max_queued: int = Field(
        1000, ge=1, description="runs that may wait in the queue; beyond, new runs are refused"
    )
    max_run_memory: Annotated[int | None, BYTES] = Field(
        None,
        ge=2**20,
        description="bytes of memory one run may be estimated to need (its model, optimizer, "
        "activations and data); default: the machine's memory over max_runs, at most 16 GiB",
    )
    max_run_disk: Annotated[int, BYTES] = Field(
        4 * GiB,
        ge=2**20,
        description="bytes of records one run may keep (estimated from its config before it "
        "is queued; counted as they come for a script's run)",
    )
    cors_origins: Annotated[list[str], Flag("cors-origin")] = Field(
        default_factory=list,
        description="origins whose pages may call the API (CORS)",
    )
    client_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds without a record, status or heartbeat after which a script's run "
        "(bnscope.client) is marked failed",
    )
    worker_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds without a heartbeat, record or status after which a run's worker "
        "(a run trained here) is taken for hung: it is killed and its run marked failed",
    )
    no_doctor: bool = Field(
        False,
        description="do not run the BN doctor (bncore.diagnose) on the records as they come in: "
        "no new diagnoses, no warnings to scripts (what it costs: benchmarks/api.py "
        "--doctor-off)",
    )
    doctor_share: float = Field(
        0.05,
        gt=0,
        le=1,
        description="the share of a run's time the BN doctor may take diagnosing its records: "
        "batches that come sooner after a diagnosis wait and are diagnosed together with the "
        "next (1: each batch as it comes)",
    )
    public_url: str | None = Field(
        None, description="how workers reach the API; default: http://127.0.0.1:<port>"
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="where runs train: 'local' (a process each, on this machine) or 'ray' "
        "(a task each on the Ray cluster at ray_address; pip install 'bnscope[ray]')",
    )
    worker_start: Literal["preloaded", "spawn"] = Field(
        "preloaded",
        description="how a local run's worker starts: 'preloaded' (forked from a process that "
        "imported torch and bncore when the server started: its first step about a second "
        "after the launch) or 'spawn' (a fresh Python each, importing them: seconds more)",
    )
    ray_address: str | None = Field(
        None,
        description="the Ray cluster (host:port, or 'auto'); default: a cluster of this machine",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.protect_reads and not self.token:
            raise ValueError("protect_reads needs a token (--token): reads are protected by it")
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'bnscope.db').resolve()}"

    @property
    def dataset_root(self) -> Path:
        """Where runs' ``data.path`` must lead: ``data_root``, or ``data_dir/datasets``."""
        return self.data_root if self.data_root is not None else self.data_dir / "datasets"

    @property
    def run_memory(self) -> int:
        """What one run may use: ``max_run_memory``, or the machine's memory shared by the runs
        that train at once (1 to 16 GiB)."""
        if self.max_run_memory is not None:
            return self.max_run_memory
        return int(min(16 * GiB, max(GiB, machine_memory() // self.max_runs)))

    def threads_per_run(self) -> int:
        return self.worker_threads or max(1, (os.cpu_count() or 2) // self.max_runs)

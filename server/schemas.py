"""What the API takes and returns, beyond bncore's RunConfig (the body of POST /api/runs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bncore.record.tables import TABLES
from bncore.status import REPORTED, RunStatus
from server.meta import check_meta
from server.store.schema import MAX_INT

MAX_META_DEPTH = 32  # levels of objects and lists in a run's meta (or final)
MAX_META_BYTES = 100_000  # its size as JSON


def bounded_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run's meta or final as it may be kept: at most MAX_META_DEPTH levels deep and
    MAX_META_BYTES as JSON (it rides along with every listing of the run), numbers in 64 bits;
    ValueError (a 422 that names the limit) otherwise."""
    if value is None:
        return value
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_META_DEPTH:
            raise ValueError(f"nests deeper than {MAX_META_DEPTH} levels of objects and lists")
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:  # an integer beyond 64 bits
        raise ValueError(f"cannot be kept: {exc}") from None
    if size > MAX_META_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_META_BYTES} are kept")
    return value


class Links(BaseModel):
    self: str
    layers: str
    metrics: str
    channels: str
    stream: str
    export: str
    cancel: str


class DoctorCounts(BaseModel):
    """What the BN doctor found in a run that is active and not silenced (a runs list's
    badge)."""

    errors: int
    warnings: int


class RunOut(BaseModel):
    """A run: what it is, how far it got, where its records are."""

    id: str
    name: str | None
    status: RunStatus
    source: Literal["server", "client"]
    sweep_id: str | None
    config: dict[str, Any] | None
    meta: dict[str, Any] | None
    final: dict[str, Any] | None
    message: str | None
    steps_done: int
    steps_total: int | None
    queue_position: int | None = None
    queued_for: Literal["workers", "slot"] | None = Field(
        None,
        description="what a queued run waits for: 'workers' (the server's workers are starting, "
        "importing PyTorch: its first seconds; on a new machine, building the fused kernel too) "
        "or 'slot' (a free worker)",
    )
    pid: int | None = Field(None, description="the worker process, while training")
    heartbeat_s: float | None = Field(
        None,
        description="for a script's new run: send POST .../heartbeat at least this often; a "
        "run silent for the server's client_timeout is marked failed",
    )
    write_token: str | None = Field(
        None,
        description="for a script's new run, and only in that answer: the secret its records, "
        "status and heartbeats must carry (header X-Run-Token)",
    )
    created_at: float
    started_at: float | None
    finished_at: float | None
    links: Links
    doctor: DoctorCounts | None = Field(
        None,
        description="in a list of runs: the BN doctor's active, unsilenced errors and warnings "
        "(GET .../diagnoses for what they are)",
    )


class RunList(BaseModel):
    items: list[RunOut]
    total: int
    limit: int
    offset: int


class ClientRunCreate(BaseModel):
    """A run trained by the caller's own script, which streams its records in (bnscope.client)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    meta: dict[str, Any] = Field(
        default_factory=dict, description="layers, channels and anything to show with it"
    )
    steps_total: int | None = Field(None, ge=1, le=100_000_000, strict=True)

    @field_validator("meta")
    @classmethod
    def _bounded(cls, meta: dict[str, Any]) -> dict[str, Any]:
        return check_meta(bounded_json(meta) or {})


class StatusUpdate(BaseModel):
    """How a run is doing, as its worker (or client) reports it."""

    model_config = ConfigDict(extra="forbid")
    status: RunStatus = Field(description=f"one of {', '.join(REPORTED)}")
    message: str | None = Field(None, max_length=10_000)
    final: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    steps_done: int | None = Field(None, ge=0, le=MAX_INT, strict=True)
    traceback: str | None = Field(None, max_length=10_000)

    @field_validator("meta", "final")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return bounded_json(value)

    @field_validator("meta")
    @classmethod
    def _readable(cls, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if meta is None else check_meta(meta)

    @field_validator("status")
    @classmethod
    def _reported(cls, status: RunStatus) -> RunStatus:
        if status.value not in REPORTED:
            raise ValueError(
                f"a run reports one of {', '.join(REPORTED)}; {status.value!r} is the server's"
            )
        return status


class SweepCreate(BaseModel):
    """One run per point of ``grid`` (dotted config fields, each with the values to try), or per
    entry of ``points`` (dotted fields and values of each run, for settings that move together,
    such as the learning rate with the batch size)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    base: dict[str, Any] = Field(default_factory=dict, description="a RunConfig, partial")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description='e.g. {"norm.kind": ["batch", "none"], "optim.lr": [0.01, 0.1]}',
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description='instead of grid, e.g. [{"batch_size": 8, "optim.lr": 0.01}, '
        '{"batch_size": 64, "optim.lr": 0.08}]',
    )


class SweepOut(BaseModel):
    id: str
    name: str | None
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    created_at: float
    experiment: str | None = Field(None, description="the experiment it was started from")
    runs: list[RunOut]


class ExperimentOut(BaseModel):
    key: str
    title: str
    claim: str
    note: str
    base: dict[str, Any] = Field(description="the quick-size base config")
    grid: dict[str, list[Any]]
    full: dict[str, Any] = Field(description="dotted overrides of the full (GPU) size")
    runs: int = Field(description="runs in the sweep")


class ExperimentStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: Literal["quick", "full"] = Field("quick", description="quick: minutes on a CPU")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='dotted config fields set in every run, e.g. {"data.name": "mnist", '
        '"data.path": "/data/mnist"}',
    )


class PanelOut(BaseModel):
    title: str
    kind: Literal["over_steps", "by_value"]
    x_label: str
    y_label: str
    log_x: bool
    series: list[dict[str, Any]] = Field(description="{name, x, y, theory}; null: no value")


class ArmDiagnosis(BaseModel):
    rule: str
    severity: Literal["error", "warning", "info"]


class ArmDiagnoses(BaseModel):
    """What the BN doctor found in one run of a sweep (not the rules silenced)."""

    run_id: str
    name: str | None
    run: str = Field(description="the run's grid values, as the panels name it")
    diagnoses: list[ArmDiagnosis]


class ProvokedOut(BaseModel):
    """A BN pitfall the experiment provokes on purpose, and whether the BN doctor found it in
    the runs at ``where`` and not in those at ``control`` (null while they are missing)."""

    rule: str
    where: str
    control: str
    found: bool | None
    control_clear: bool | None


class VerdictOut(BaseModel):
    agrees: bool
    text: str
    measured: str = Field(
        default="", description="the measurement in short, with its spread over seeds"
    )
    test: str = Field(default="", description="the test it was put to, with its margin")


class ExperimentResult(BaseModel):
    sweep_id: str
    experiment: str
    title: str
    claim: str
    note: str
    runs_total: int
    runs_finished: int
    panels: list[PanelOut]
    verdict: VerdictOut | None = Field(
        default=None,
        description="whether this measurement agrees with the paper (null while runs are missing)",
    )
    diagnoses: list[ArmDiagnoses] = Field(
        default_factory=list, description="per run of the sweep: what the BN doctor found"
    )
    provoked: list[ProvokedOut] = Field(
        default_factory=list,
        description="the pitfalls the experiment provokes on purpose, and whether the BN "
        "doctor found each where it is provoked and not in the control",
    )


class Series(BaseModel):
    layer: str
    stat: str
    steps: list[int]
    values: list[float | None]
    points_total: int


class MetricsOut(BaseModel):
    run_id: str
    max_points: int
    series: list[Series]


class LayerChannels(BaseModel):
    """One layer's per-channel arrays at one step (columns: docs/statistics.md)."""

    model_config = ConfigDict(extra="allow")
    layer: str
    step: int


class ChannelsOut(BaseModel):
    run_id: str
    layers: list[LayerChannels]


class RecordTable(BaseModel):
    """One table of a batch: equal-length columns, ``step`` among them (``layer`` too in
    layers and channels); the other columns are statistics (docs/statistics.md), numbers or
    null (NaN), a row of per-channel numbers each in channels."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"additionalProperties": {"type": "array"}}
    )
    step: list[Annotated[int, Field(ge=0, le=MAX_INT)]]


#: The body of ``POST /api/runs/{id}/records`` (read by server.batches, which the route hands the
#: raw bytes to: this is what the schema documents).
RECORDS_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "seq": {
                        "type": "integer", "minimum": 1, "maximum": MAX_INT,
                        "description": "increasing per run: a batch sent again is stored once",
                    },
                    **{t: RecordTable.model_json_schema() for t in TABLES},
                },
            }
        }
    },
}  # fmt: skip


class DiagnosisOut(BaseModel):
    """A batch-norm pitfall the BN doctor (bncore.diagnose) found in a run; the rules:
    docs/diagnoses.md."""

    rule: str = Field(description="the rule's stable id, e.g. nonfinite-running-stats")
    severity: Literal["error", "warning", "info"]
    layers: list[str] = Field(description="the BN layers it is about (empty: the whole run)")
    first_step: int
    last_step: int | None = Field(description="when it cleared; null while it is active")
    evidence: dict[str, Any] = Field(description="the numbers that fired, beside the threshold")
    message: str
    fix: str = Field(description="what to change, as code or config")
    references: list[str]
    silenced: bool = Field(description="marked known and intended: left out of badges, warnings")


class CheckedOut(BaseModel):
    rule: str
    checks: str = Field(description="what the rule checks, in a few words")
    checked: bool = Field(description="whether the run could be checked for it")
    reason: str | None = Field(description="why not, where it could not")


class DiagnosesOut(BaseModel):
    """What the BN doctor found in a run, and what it checked."""

    diagnoses: list[DiagnosisOut] = Field(description="worst and earliest first")
    checked: list[CheckedOut]
    steps: int = Field(description="the last step of the records diagnosed")


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    silenced: bool


class SilenceOut(BaseModel):
    rule: str
    silenced: bool
    diagnosis: DiagnosisOut | None = Field(description="the rule's diagnosis of the run, if any")


class IngestAck(BaseModel):
    seq: int
    stored: bool
    diagnoses: list[DiagnosisOut] = Field(
        default_factory=list,
        description="what the BN doctor made or changed from this batch, active and not "
        "silenced (bnscope.client warns of each rule once)",
    )


class ErrorField(BaseModel):
    field: str = Field(
        description="the dotted field (optim.lr) or parameter it is about; '' for the request"
    )
    message: str
    point: str | None = Field(None, description="for a sweep: the grid point it is about")


class ErrorOut(BaseModel):
    """Every refused request (4xx): one line to show, and the fields to fix."""

    message: str = Field(description="one line: what to fix")
    detail: list[ErrorField]


#: What every operation documents besides its success: a 4xx in one shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorOut, "description": "refused: `message` says what to fix"}
}

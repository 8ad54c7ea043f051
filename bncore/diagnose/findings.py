"""What the BN doctor says: a :class:`Diagnosis` per pitfall found in a run, built from the
:class:`Finding` s its rules make as the records come in."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["SEVERITIES", "Diagnosis", "Finding", "Severity", "evidence_value"]

Severity = Literal["error", "warning", "info"]
#: Worst first: the order a run's diagnoses are listed in.
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")


def evidence_value(value: Any) -> Any:
    """A JSON-safe number: floats rounded to 4 significant digits, NaN and infinities as
    text (evidence says "nan" rather than dropping the value that fired)."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return str(v)
    return float(f"{v:.4g}")


@dataclass
class Finding:
    """What one rule saw at one logged step: the layers it is about (empty: the run), the
    numbers that fired beside their threshold, one plain sentence; ``fix`` where the rule's
    general fix is not concrete enough; ``severity`` where the finding is less (or more) grave
    than the rule's. ``resolved``: the condition has cleared at ``step``. ``refresh``: a new
    account of an active diagnosis (its evidence and message replace the old ones)."""

    step: int
    layers: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    fix: str | None = None
    severity: Severity | None = None
    resolved: bool = False
    refresh: bool = False


@dataclass
class Diagnosis:
    """A pitfall a run has: ``rule`` (a stable id, docs/diagnoses.md), ``severity``,
    ``layers`` (module names, the first one found first), ``first_step``, ``last_step`` (None
    while still active), ``evidence`` (the numbers that fired, beside their threshold),
    ``message`` (one sentence), ``fix`` (what to change, as code or config), ``references``
    (papers, docs, user reports), ``silenced`` (set per run by the user: known and intended)."""

    rule: str
    severity: Severity
    layers: list[str]
    first_step: int
    last_step: int | None
    evidence: dict[str, Any]
    message: str
    fix: str
    references: list[str]
    silenced: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evidence"] = {k: evidence_value(v) for k, v in self.evidence.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def rank(self) -> tuple[int, int]:
        """Sort key: worst first, then earliest."""
        return SEVERITIES.index(self.severity), self.first_step

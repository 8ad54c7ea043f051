"""What every rule is: an instrument that declares what it needs, keeps its own compact state
across batches of records, and says what it finds (Cockpit's quantities and instruments, for
BN's pitfalls)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from bncore.diagnose.facts import LayerFacts, RunFacts
from bncore.diagnose.findings import Diagnosis, Finding, Severity
from bncore.diagnose.view import RecordsView

__all__ = ["Rule"]

#: Steps after a layer starts (or its EMA is reset) that its running statistics are still
#: warming up: 3 / momentum (the EMA keeps e^-3 = 5% of where it started), at most this.
WARMUP_CAP = 300


class Rule:
    """A pitfall's check. Subclasses set the class attributes (docs/diagnoses.md is written
    from them) and :meth:`feed`; :meth:`missing` says why a run cannot be checked."""

    id: ClassVar[str]
    severity: ClassVar[Severity]
    #: What it checks, in a few words ("what was checked" when nothing fires).
    checks: ClassVar[str]
    #: The symptom, the threshold and why (the documentation's paragraph).
    threshold: ClassVar[str]
    fix: ClassVar[str]
    references: ClassVar[tuple[str, ...]]
    #: Alternatives, any one of which makes a run checkable: each a set of ``table.column``
    #: names, or ``facts.<what>`` for a fact the meta must give.
    needs: ClassVar[tuple[tuple[str, ...], ...]] = ((),)

    def missing(self, columns: set[str], facts: RunFacts) -> str | None:
        """Why this run cannot be checked yet (None: it can)."""
        if not facts.has_batch_norm and self.needs != ((),):
            return "the run has no batch normalization"
        for option in self.needs:
            if all(self._has(n, columns, facts) for n in option):
                return None
        wanted = " or ".join(", ".join(o) for o in self.needs)
        return f"needs {wanted}"

    @staticmethod
    def _has(need: str, columns: set[str], facts: RunFacts) -> bool:
        if need.startswith("facts."):
            return bool(getattr(facts, need.removeprefix("facts."), None))
        return need in columns

    def feed(
        self, view: RecordsView, facts: RunFacts, active: Mapping[str, Diagnosis]
    ) -> Iterable[Finding]:
        """What this batch of records shows (``active``: the run's diagnoses so far)."""
        raise NotImplementedError


def warmup(layer: LayerFacts, facts: RunFacts) -> int:
    """Steps an EMA of ``layer`` takes to forget its start: 3/momentum, at most WARMUP_CAP
    and a quarter of the run where its length is known."""
    steps = WARMUP_CAP
    if layer.momentum:
        steps = min(steps, int(3 / layer.momentum))
    if facts.steps_total:
        steps = min(steps, max(1, facts.steps_total // 4))
    return steps

"""The doctor: every rule over a run's records, as they come (:class:`Doctor`, as the server
runs it on ingest and a script's sink could) or all at once (:func:`diagnose`, on a
``bncore.train`` result or a run's Parquet files). Fed in one batch or many, it says the same."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bncore.diagnose.facts import RunFacts, facts_of
from bncore.diagnose.findings import SEVERITIES, Diagnosis, Finding
from bncore.diagnose.rules import RULES, Rule
from bncore.diagnose.view import RecordsView
from bncore.record.sinks import read_parquet
from bncore.record.tables import Records, Table

__all__ = ["Doctor", "diagnose", "diagnose_files"]


class Doctor:
    """A run's diagnoses, kept up to date as batches of records arrive.

    ``meta``: the run's meta (bncore.diagnose.facts reads it); :meth:`update_meta` when it
    changes (a watcher learns a model's structure on its first forward). ``silenced``: rule
    ids the user silenced for this run: still diagnosed, marked silenced.
    """

    def __init__(self, meta: Mapping[str, Any] | None = None, silenced: set[str] | None = None):
        self.facts: RunFacts = facts_of(meta)
        self.rules: list[Rule] = [cls() for cls in RULES]
        self.found: dict[str, Diagnosis] = {}
        self.silenced = set(silenced or ())
        self.columns: set[str] = set()
        self.last_step = 0

    def update_meta(self, meta: Mapping[str, Any] | None) -> None:
        self.facts = facts_of(meta)

    def feed(self, tables: Records | Mapping[str, Table]) -> list[Diagnosis]:
        """Take a batch of records (``Records`` or tables by name); the diagnoses it made or
        changed."""
        if isinstance(tables, Records):
            tables = tables.tables()
        view = RecordsView(tables)
        self.columns |= view.columns
        if view.last_step is not None:
            self.last_step = max(self.last_step, view.last_step)
        changed: dict[str, Diagnosis] = {}
        for rule in self.rules:
            if rule.missing(self.columns, self.facts) is not None:
                continue
            for finding in rule.feed(view, self.facts, self.found):
                changed[rule.id] = self._take(rule, finding)
        return list(changed.values())

    def _take(self, rule: Rule, f: Finding) -> Diagnosis:
        d = self.found.get(rule.id)
        if f.resolved:
            if d is not None and d.last_step is None:
                d.last_step = f.step
            assert d is not None  # a rule resolves only what it found
            return d
        severity = f.severity or rule.severity
        if d is None:
            d = self.found[rule.id] = Diagnosis(
                rule=rule.id,
                severity=severity,
                layers=list(f.layers),
                first_step=f.step,
                last_step=None,
                evidence=dict(f.evidence),
                message=f.message,
                fix=f.fix or rule.fix,
                references=list(rule.references),
                silenced=rule.id in self.silenced,
            )
            return d
        d.layers += [n for n in f.layers if n not in d.layers]
        d.last_step = None  # active again
        if f.refresh:
            d.evidence, d.message = dict(f.evidence), f.message
        if SEVERITIES.index(severity) < SEVERITIES.index(d.severity):
            d.severity, d.evidence, d.message = severity, dict(f.evidence), f.message
        return d

    def silence(self, rule: str, silenced: bool = True) -> Diagnosis | None:
        """Mark ``rule`` silenced for this run (or not); its diagnosis, if it has one."""
        (self.silenced.add if silenced else self.silenced.discard)(rule)
        d = self.found.get(rule)
        if d is not None:
            d.silenced = silenced
        return d

    @property
    def diagnoses(self) -> list[Diagnosis]:
        """Every diagnosis so far, worst and earliest first."""
        return sorted(self.found.values(), key=lambda d: d.rank)

    def checked(self) -> list[dict[str, Any]]:
        """What the run was checked for: each rule, and why it could not be where it could not
        (``{"rule", "checks", "checked", "reason"}``)."""
        out = []
        for rule in self.rules:
            reason = rule.missing(self.columns, self.facts)
            out.append({"rule": rule.id, "checks": rule.checks, "checked": reason is None,
                        "reason": reason})  # fmt: skip
        return out

    def report(self) -> dict[str, Any]:
        """The API's shape: ``{"diagnoses": [...], "checked": [...], "steps": N}``."""
        return {
            "diagnoses": [d.to_dict() for d in self.diagnoses],
            "checked": self.checked(),
            "steps": self.last_step,
        }


def diagnose(
    records: Records | Mapping[str, Table], meta: Mapping[str, Any] | None = None
) -> Doctor:
    """Every rule over a whole run's records at once; the doctor holds the result
    (``.diagnoses``, ``.checked()``, ``.report()``)."""
    doctor = Doctor(meta)
    doctor.feed(records)
    return doctor


def diagnose_files(folder: str | Path) -> Doctor:
    """The diagnoses of a run written by ``bnscope train --out FOLDER`` (its Parquet tables,
    and run.json, which holds its meta)."""
    folder = Path(folder)
    meta_path = folder / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return diagnose(read_parquet(folder), meta)

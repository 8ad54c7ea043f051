"""The BN doctor on the server: each run's records are diagnosed as they are ingested
(bncore.diagnose), whoever posts them (a server worker, a user's script, Lightning, each rank of a
distributed run: they all come through RunService.ingest).

One :class:`~bncore.diagnose.Doctor` per run taking records, built from the run's meta (and
told when the meta changes), fed each batch once it is stored, under a lock of the run's own so
that two ranks' batches are stored and fed in one order. What it makes or changes is upserted
into the store's ``diagnoses`` (one row per run and rule), sent to the run's live listeners as a
``diagnosis`` event, and handed back for the ingest's acknowledgement. A doctor that is missing
(the server restarted, or it was never built in this process) is rebuilt by feeding it the
run's stored records; one that raises is logged and switched off for that run: an ingest never
fails because of it. ``Settings.no_doctor`` turns it all off.

Its cost is bounded: a run's doctor may take ``Settings.doctor_share`` of the time (5%); a batch
that comes sooner after the last diagnosis waits, and is diagnosed with the next one that may be,
together (the doctor says the same of batches fed one by one or together), or when the run ends
or its diagnoses are asked for. A worker flushes every 50 ms, a few steps at a time: diagnosing
each such batch alone cost as much as storing it.

A run that has ended is not diagnosed again: its diagnoses are read from the store, and what it
was checked for (``checked``) from its doctor when it ended, or from a doctor rebuilt offline
from its records (kept for the next ask).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bncore.diagnose import RULES, Diagnosis, Doctor
from bncore.record.tables import TABLES, Batch, channel_table
from bncore.status import ACTIVE
from server.errors import NotFound
from server.hub import Event, Hub
from server.settings import Settings
from server.store import Store

log = logging.getLogger("bnscope.server")

#: Every rule's id: what may be silenced.
RULE_IDS = tuple(rule.id for rule in RULES)
#: Ended runs whose ``checked`` is kept in memory, at most.
CHECKED_KEPT = 256


@dataclass
class _Patient:
    """A run taking records, as the doctor follows it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    doctor: Doctor | None = None
    off: bool = False  # the doctor raised: not diagnosed any more while the run takes records
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # by rule, as in the store
    waiting: list[Batch] = field(default_factory=list)  # stored, not yet diagnosed
    seq: int = 0  # the last batch stored
    next_at: float = 0.0  # time.monotonic() from which the doctor may run again


class DiagnosisService:
    def __init__(self, settings: Settings, store: Store, hub: Hub) -> None:
        self.store, self.hub = store, hub
        self.enabled = not settings.no_doctor
        self.share = settings.doctor_share
        self._patients: dict[str, _Patient] = {}
        self._guard = threading.Lock()  # over _patients and _checked
        #: ended runs: (checked, steps) of their doctor
        self._checked: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()

    # -- on ingest ------------------------------------------------------------------------

    @contextlib.contextmanager
    def holding(self, run_id: str) -> Iterator[None]:
        """Around storing a batch of the run and :meth:`feed` ing it: one batch of a run at a
        time, so the doctor sees the batches in the order they were stored."""
        if not self.enabled:
            yield
            return
        with self._patient(run_id).lock:
            yield

    def feed(self, run: dict[str, Any], seq: int, batch: Batch) -> list[dict[str, Any]]:
        """The run's batch number ``seq``, just stored (inside :meth:`holding`): the diagnoses
        it made or changed (with those of batches that waited for it) that are active and not
        silenced, as ``Diagnosis.to_dict()``. Never raises: a doctor that does is logged and
        switched off for the run."""
        if not self.enabled:
            return []
        patient = self._patient(run["id"])
        if patient.off:
            return []
        patient.seq = seq
        try:
            if patient.doctor is None and seq > 1:  # records came before this process saw any
                self._rebuild(run, patient)  # from the store: this batch is in it already
                assert patient.doctor is not None
                made = self._keep(run["id"], patient, patient.doctor.diagnoses)
            else:
                if patient.doctor is None:
                    self._start(run, patient)
                patient.waiting.append(batch)
                if time.monotonic() < patient.next_at:
                    return []  # over its share of the time: diagnosed with the next
                made = self._catch_up(run["id"], patient)
        except Exception:
            self._failed(run["id"], patient)
            return []
        return [d for d in made if d["last_step"] is None and not d["silenced"]]

    def _catch_up(self, run_id: str, patient: _Patient) -> list[dict[str, Any]]:
        """Diagnose the batches waiting (under the patient's lock); what changed, stored and
        told. The time it took sets when the doctor may run again."""
        if patient.doctor is None or not patient.waiting:
            return []
        started = time.perf_counter()
        changed: dict[str, Diagnosis] = {}
        for tables in _together(patient.waiting):
            changed.update((d.rule, d) for d in patient.doctor.feed(tables))
        patient.waiting = []
        took = time.perf_counter() - started
        patient.next_at = time.monotonic() + took * (1 / self.share - 1)
        return self._keep(run_id, patient, changed.values())

    def _failed(self, run_id: str, patient: _Patient) -> None:
        log.exception("the BN doctor failed on run %s: it is off for this run", run_id)
        patient.off, patient.doctor, patient.waiting = True, None, []

    def meta_changed(self, run: dict[str, Any]) -> None:
        """The run's meta changed (a watcher learned its model's structure): its doctor reads
        the facts again."""
        patient = self._patients.get(run["id"])
        if patient is None:
            return  # a doctor started later reads the meta as stored (_start)
        with patient.lock:  # after a doctor being started: it may have read the old meta
            if patient.doctor is not None:
                try:
                    patient.doctor.update_meta(_meta_of(run))
                except Exception:
                    self._failed(run["id"], patient)

    def ended(self, run_id: str) -> None:
        """The run takes no more records: its doctor goes, what it checked is kept."""
        patient = self._patients.get(run_id)
        if patient is None:
            return
        with patient.lock:  # after a batch being stored and fed
            try:
                self._catch_up(run_id, patient)  # the batches that waited
            except Exception:
                self._failed(run_id, patient)
            if patient.doctor is not None:
                self._remember(run_id, patient.doctor.checked(), patient.doctor.last_step)
            with self._guard:
                self._patients.pop(run_id, None)

    def forget(self, run_id: str) -> None:
        """The run is deleted (its rows went with it)."""
        with self._guard:
            self._patients.pop(run_id, None)
            self._checked.pop(run_id, None)

    # -- reading and silencing --------------------------------------------------------------

    def report(self, run: dict[str, Any]) -> dict[str, Any]:
        """``{"diagnoses": [...], "checked": [...], "steps": N}``: the run's diagnoses as
        stored (worst and earliest first), what it was checked for, and through which step."""
        checked, steps = self._checked_of(run)  # first: the batches that waited are diagnosed
        found = sorted(self.store.diagnoses.of_run(run["id"]), key=_rank)
        return {"diagnoses": found, "checked": checked, "steps": steps}

    def silence(self, run: dict[str, Any], rule: str, silenced: bool) -> dict[str, Any]:
        """Mark the run's ``rule`` silenced (or not): still listed, left out of badges and
        warnings. NotFound for a rule that does not exist."""
        if rule not in RULE_IDS:
            raise NotFound(f"no rule {rule!r}; the rules are: {', '.join(RULE_IDS)}")
        run_id = run["id"]
        patient = self._patients.get(run_id)
        with patient.lock if patient is not None else contextlib.nullcontext():
            if patient is not None and patient.doctor is not None:
                patient.doctor.silence(rule, silenced)
            found = self.store.diagnoses.silence(run_id, rule, silenced)
            if patient is not None and found is not None:
                patient.stored[rule] = found
        if found is not None:
            self.hub.publish(run_id, Event("diagnosis", run["seq"], found))
        return {"rule": rule, "silenced": silenced, "diagnosis": found}

    def counts(self, run_ids: list[str]) -> dict[str, dict[str, int]]:
        """Per run, its active and unsilenced errors and warnings (server.store.diagnoses)."""
        return self.store.diagnoses.counts(run_ids)

    def of_runs(self, run_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Each run's stored diagnoses (worst and earliest first), by run id."""
        found = self.store.diagnoses.of_runs(run_ids)
        return {k: sorted(v, key=_rank) for k, v in found.items()}

    # -- the doctors ------------------------------------------------------------------------

    def _patient(self, run_id: str) -> _Patient:
        with self._guard:
            found = self._patients.get(run_id)
            if found is None:
                found = self._patients[run_id] = _Patient()
            return found

    def _start(self, run: dict[str, Any], patient: _Patient) -> None:
        """A new doctor for a run without records before (the user may have silenced rules),
        from the meta as stored now: another request (a rank's, the script's meta update) may
        have changed it since ``run`` was read."""
        run = self.store.runs.get(run["id"]) or run
        patient.doctor = Doctor(_meta_of(run), silenced=self.store.diagnoses.silenced(run["id"]))
        patient.stored = {d["rule"]: d for d in self.store.diagnoses.of_run(run["id"])}

    def _rebuild(self, run: dict[str, Any], patient: _Patient) -> None:
        """The doctor, fed the run's stored records (the run's diagnoses as stored beside it:
        only what differs from them is written and told)."""
        patient.doctor = self._offline(run)
        patient.stored = {d["rule"]: d for d in self.store.diagnoses.of_run(run["id"])}

    def _offline(self, run: dict[str, Any]) -> Doctor:
        """A doctor fed the run's stored records (through the store's reads)."""
        run_id = run["id"]
        doctor = Doctor(_meta_of(run), silenced=self.store.diagnoses.silenced(run_id))
        doctor.feed({name: self.store.reads.table(run_id, name) for name in TABLES})
        return doctor

    def _keep(
        self, run_id: str, patient: _Patient, changed: Iterable[Diagnosis]
    ) -> list[dict[str, Any]]:
        """Store and tell the diagnoses that differ from what is stored; those, as dicts."""
        made = []
        for d in changed:
            data = d.to_dict()
            if patient.stored.get(d.rule) != data:
                made.append(data)
        if not made:
            return []
        self.store.diagnoses.upsert(run_id, made)
        for data in made:
            patient.stored[data["rule"]] = data
            self.hub.publish(run_id, Event("diagnosis", patient.seq, data))
        return made

    def _checked_of(self, run: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """(checked, steps) from the run's doctor, or as kept when it ended, or from a doctor
        rebuilt from its records (which follows the run from then on, if it takes records)."""
        run_id = run["id"]
        patient = self._patients.get(run_id)
        if patient is not None and patient.doctor is not None:
            with patient.lock:
                try:
                    self._catch_up(run_id, patient)
                except Exception:
                    self._failed(run_id, patient)
                doctor = patient.doctor
                if doctor is not None:
                    return doctor.checked(), doctor.last_step
        with self._guard:
            kept = self._checked.get(run_id)
        if kept is not None:
            return kept
        try:
            if self.enabled and run["status"] in ACTIVE:
                patient = self._patient(run_id)
                with patient.lock:
                    if patient.doctor is None and not patient.off:
                        self._rebuild(run, patient)
                        assert patient.doctor is not None
                        patient.seq = run["seq"]
                        self._keep(run_id, patient, patient.doctor.diagnoses)
                    if patient.doctor is not None:
                        return patient.doctor.checked(), patient.doctor.last_step
            doctor = self._offline(run)
        except Exception:
            log.exception("the BN doctor could not read run %s again", run_id)
            return [], int(run.get("steps_done") or 0)
        if run["status"] not in ACTIVE:
            self._remember(run_id, doctor.checked(), doctor.last_step)
        return doctor.checked(), doctor.last_step

    def _remember(self, run_id: str, checked: list[dict[str, Any]], steps: int) -> None:
        with self._guard:
            self._checked[run_id] = (checked, steps)
            self._checked.move_to_end(run_id)
            while len(self._checked) > CHECKED_KEPT:
                self._checked.popitem(last=False)


def _together(batches: list[Batch]) -> Iterator[Batch]:
    """Batches as few as they can be: each run of batches with the same tables and columns,
    concatenated (a batch whose columns differ starts a new one)."""

    def columns(batch: Batch) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple((name, tuple(table)) for name, table in batch.items())

    for _, same in itertools.groupby(batches, key=columns):
        parts = list(same)
        if len(parts) == 1:
            yield parts[0]
            continue
        out: Batch = {}
        for name in parts[0]:
            tables = [p[name] for p in parts]
            if name == "channels":  # layers of several widths: ragged rows
                out[name] = channel_table(tables)
            else:
                out[name] = {c: np.concatenate([t[c] for t in tables]) for c in tables[0]}
        yield out


def _meta_of(run: dict[str, Any]) -> dict[str, Any]:
    """What the doctor reads of a run: its meta, with the config of a run trained here."""
    meta = dict(run.get("meta") or {})
    if run.get("config") and "config" not in meta:
        meta["config"] = run["config"]
    return meta


def _rank(d: dict[str, Any]) -> tuple[int, int]:
    """Worst and earliest first (bncore.diagnose.Diagnosis.rank)."""
    return Diagnosis.from_dict(d).rank

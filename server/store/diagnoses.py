"""The BN doctor's diagnoses of each run (the ``diagnoses`` table): one row per run and rule,
written when the doctor makes or changes one (server.service.diagnoses), read by the run view,
the runs list's badges and an experiment's result without diagnosing again."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from server.store.schema import diagnoses
from server.store.series import upsert_statement

#: A Diagnosis's fields (bncore.diagnose.findings) kept as JSON text, and their column.
JSON_COLUMNS = {"layers": "layers", "evidence": "evidence", "references": "refs"}
#: The rest, each a column of its own name.
PLAIN_COLUMNS = ("severity", "first_step", "last_step", "message", "fix", "silenced")
#: A Diagnosis's fields, in its order.
FIELDS = ("rule", "severity", "layers", "first_step", "last_step", "evidence", "message", "fix",
          "references", "silenced")  # fmt: skip
#: Only these are counted in a run's badge: errors and warnings.
COUNTED = ("error", "warning")


class DiagnosisTable:
    """Rows of ``diagnoses`` as Diagnosis dicts (``Diagnosis.to_dict()``'s shape). Writes go
    one at a time through ``lock``, shared with the rest of the store; reads take no lock."""

    def __init__(self, engine: sa.Engine, lock: threading.Lock) -> None:
        self.engine, self._write = engine, lock

    def upsert(self, run_id: str, found: Iterable[dict[str, Any]]) -> None:
        """Store each diagnosis (a ``Diagnosis.to_dict()``), replacing the run's row of its
        rule."""
        now = time.time()
        rows = [_row(run_id, d, now) for d in found]
        if not rows:
            return
        update = (*JSON_COLUMNS.values(), *PLAIN_COLUMNS, "updated_at")
        with self._write, self.engine.begin() as conn:
            conn.execute(upsert_statement(self.engine, diagnoses, update), rows)

    def silence(self, run_id: str, rule: str, silenced: bool) -> dict[str, Any] | None:
        """Mark the run's ``rule`` silenced (or not), whether or not it has found anything
        yet; the rule's diagnosis, if it has one."""
        stmt = upsert_statement(self.engine, diagnoses, ("silenced", "updated_at"))
        row = {"run_id": run_id, "rule": rule, "silenced": silenced, "updated_at": time.time()}
        with self._write, self.engine.begin() as conn:
            conn.execute(stmt, [row])
        return next((d for d in self.of_run(run_id) if d["rule"] == rule), None)

    def of_run(self, run_id: str) -> list[dict[str, Any]]:
        """The run's diagnoses (not the rules merely silenced), in no particular order."""
        return self.of_runs([run_id]).get(run_id, [])

    def of_runs(self, run_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Each run's diagnoses, by run id (runs without any are left out)."""
        if not run_ids:
            return {}
        q = diagnoses.select().where(
            diagnoses.c.run_id.in_(run_ids), diagnoses.c.severity.is_not(None)
        )
        out: dict[str, list[dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(q.order_by(diagnoses.c.run_id, diagnoses.c.rule)).mappings():
                out.setdefault(r["run_id"], []).append(_load(r))
        return out

    def silenced(self, run_id: str) -> set[str]:
        """The rules silenced for the run."""
        q = sa.select(diagnoses.c.rule).where(
            diagnoses.c.run_id == run_id, diagnoses.c.silenced.is_(True)
        )
        with self.engine.connect() as conn:
            return set(conn.execute(q).scalars())

    def counts(self, run_ids: list[str]) -> dict[str, dict[str, int]]:
        """Per run, its active (not resolved), unsilenced diagnoses by severity, errors and
        warnings only: ``{run_id: {"error": 1, "warning": 2}}`` (runs without any left out)."""
        if not run_ids:
            return {}
        c = diagnoses.c
        q = (
            sa.select(c.run_id, c.severity, sa.func.count())
            .where(
                c.run_id.in_(run_ids),
                c.severity.in_(COUNTED),
                c.last_step.is_(None),
                c.silenced.is_(False),
            )
            .group_by(c.run_id, c.severity)
        )
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for run_id, severity, n in conn.execute(q):
                out.setdefault(run_id, {})[severity] = int(n)
        return out

    def delete_in(self, conn: sa.Connection, run_id: str) -> None:
        """The run's rows, in the caller's transaction."""
        conn.execute(diagnoses.delete().where(diagnoses.c.run_id == run_id))


def _row(run_id: str, d: dict[str, Any], now: float) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run_id, "rule": d["rule"], "updated_at": now}
    row.update({col: json.dumps(d[key]) for key, col in JSON_COLUMNS.items()})
    row.update({k: d[k] for k in PLAIN_COLUMNS})
    row["silenced"] = bool(row["silenced"])
    return row


def _load(r: sa.RowMapping) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": r["rule"]}
    out.update({k: r[k] for k in PLAIN_COLUMNS})
    out.update({key: json.loads(r[col] or "null") for key, col in JSON_COLUMNS.items()})
    out["silenced"] = bool(out["silenced"])
    return {k: out[k] for k in FIELDS}

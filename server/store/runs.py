"""Runs and sweeps: what each one is and how far it got (the ``runs`` and ``sweeps`` tables)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import sqlalchemy as sa

from bncore.status import ACTIVE, RunStatus
from server.meta import readable_meta
from server.store.schema import runs, sweeps

JSON_FIELDS = ("config", "meta", "final")


class RunTable:
    """Rows of ``runs`` and ``sweeps`` as plain dicts (JSON fields decoded). Writes go one at a
    time through ``lock``, shared with the series writer; reads take no lock."""

    def __init__(self, engine: sa.Engine, lock: threading.Lock) -> None:
        self.engine, self._write = engine, lock

    def create(self, **fields: Any) -> dict[str, Any]:
        row = {"steps_done": 0, "seq": 0, "client_seq": 0, "created_at": time.time(), **fields}
        with self._write, self.engine.begin() as conn:
            conn.execute(runs.insert().values(**_dump(row)))
        return self.get(row["id"]) or {}

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(runs.select().where(runs.c.id == run_id)).mappings().first()
        return _load(row) if row else None

    def search(
        self,
        status: str | None = None,
        sweep_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """Runs newest first, and how many match in all."""
        query = runs.select()
        count = sa.select(sa.func.count()).select_from(runs)
        for col, value in ((runs.c.status, status), (runs.c.sweep_id, sweep_id)):
            if value is not None:
                query, count = query.where(col == value), count.where(col == value)
        query = query.order_by(runs.c.created_at.desc(), runs.c.id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
            total = conn.execute(count).scalar_one()
        return [_load(r) for r in rows], total

    def update(self, run_id: str, **fields: Any) -> None:
        with self._write, self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(**_dump(fields)))

    def finish(self, conn: sa.Connection, run_id: str, status: str, **fields: Any) -> bool:
        """Set a final status unless the run already has one (in the caller's transaction);
        True if this call set it."""
        done = conn.execute(
            runs.update()
            .where(runs.c.id == run_id, runs.c.status.in_(ACTIVE))
            .values(status=status, finished_at=time.time(), pid=None, **_dump(fields))
        ).rowcount
        return bool(done)

    def resume(self, run_id: str) -> bool:
        """A script's run that a restart interrupted goes back to running (its script came
        back); True if this call resumed it."""
        with self._write, self.engine.begin() as conn:
            done = conn.execute(
                runs.update()
                .where(
                    runs.c.id == run_id,
                    runs.c.status == RunStatus.INTERRUPTED.value,
                    runs.c.source == "client",
                )
                .values(status=RunStatus.RUNNING.value, finished_at=None, message=None)
            ).rowcount
            return bool(done)

    def recover(self) -> list[str]:
        """At start: runs left running by a dead server become 'interrupted'; the queued ids
        are returned, oldest first, to be queued again."""
        with self._write, self.engine.begin() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.status == RunStatus.RUNNING.value)
                .values(
                    status=RunStatus.INTERRUPTED.value,
                    pid=None,
                    finished_at=time.time(),
                    message="the server stopped while this run was training; the records it "
                    "had acknowledged are kept (a script's run goes on if its script comes back)",
                )
            )
            queued = conn.execute(
                sa.select(runs.c.id)
                .where(runs.c.status == RunStatus.QUEUED.value)
                .order_by(runs.c.created_at)
            ).scalars()
            return list(queued)

    # -- sweeps -----------------------------------------------------------------------------

    def create_sweep(
        self,
        sweep_id: str,
        name: str | None,
        base: dict[str, Any],
        grid: dict[str, Any],
        experiment: str | None = None,
    ) -> None:
        with self._write, self.engine.begin() as conn:
            conn.execute(
                sweeps.insert().values(
                    id=sweep_id,
                    name=name,
                    base=json.dumps(base),
                    grid=json.dumps(grid),
                    created_at=time.time(),
                    experiment=experiment,
                )
            )

    def list_sweeps(self, experiments_only: bool = False, limit: int = 200) -> list[dict]:
        """Sweeps, newest first: id, name, experiment, created_at."""
        q = sa.select(sweeps.c.id, sweeps.c.name, sweeps.c.experiment, sweeps.c.created_at)
        if experiments_only:
            q = q.where(sweeps.c.experiment.is_not(None))
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(sweeps.c.created_at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def get_sweep(self, sweep_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sweeps.select().where(sweeps.c.id == sweep_id)).mappings().first()
        if row is None:
            return None
        out = dict(row)
        out["base"], out["grid"] = json.loads(out["base"]), json.loads(out["grid"])
        return out


def _dump(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (json.dumps(v) if k in JSON_FIELDS and v is not None else v) for k, v in fields.items()
    }


def _load(row: sa.RowMapping) -> dict[str, Any]:
    out = dict(row)
    for k in JSON_FIELDS:
        out[k] = json.loads(out[k]) if out.get(k) else None
    if out.get("meta") is not None:  # never trusted as stored: server.meta
        out["meta"] = readable_meta(out["meta"])
    return out

"""Where a run's records go: memory, Parquet files, a BN Scope server.

Every sink takes ``start(meta)``, any number of ``write(records)`` and one ``finish(summary)``
(:class:`Sink`); the training loop (bncore.run.engine), the server's workers and ``bnscope.client``
all write through them. :class:`HttpSink` posts to the ingest endpoints of a server, the same ones
for the server's own workers as for a user's script.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import orjson

from bncore.record.tables import TABLES, Records, Table, channel_column, json_columns

__all__ = [
    "HttpSink",
    "MemorySink",
    "ParquetSink",
    "Sink",
    "alike_evaluations",
    "encode",
    "error_message",
    "read_parquet",
]

log = logging.getLogger(__name__)


class Refused(RuntimeError):
    """The server refused a request (a 4xx): retrying it as it is will not help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def error_message(response: httpx.Response) -> str:
    """What a BN Scope server says when it refuses a request: its one-line ``message`` (every
    4xx is ``{"message": ..., "detail": [{"field", "message"}]}``), else the body's text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    message = body.get("message") or body.get("detail") if isinstance(body, dict) else None
    return str(message)[:500] if message else response.text[:500]


class Sink(Protocol):
    """Where a run's records go: memory, files, a server."""

    def start(self, meta: dict[str, Any]) -> None: ...

    def write(self, records: Records) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class MemorySink:
    """Keeps everything; ``records`` concatenates what was written."""

    def __init__(self) -> None:
        self.parts: list[Records] = []
        self.meta: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}

    def start(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def write(self, records: Records) -> None:
        self.parts.append(records)

    def finish(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    @property
    def records(self) -> Records:
        return Records.concat(self.parts)


def to_arrow(table: Table):
    """A pyarrow Table; per-channel columns ((rows, C) arrays, or ragged rows) become lists."""
    import pyarrow as pa

    cols = {}
    for k, v in table.items():
        if v.ndim == 2 or (v.dtype == object and len(v) and isinstance(v[0], np.ndarray)):
            rows = list(v)
            offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
            values = np.concatenate(rows).astype(np.float32) if rows else np.empty(0, np.float32)
            cols[k] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        else:
            cols[k] = pa.array(v)
    return pa.table(cols)


class ParquetSink:
    """Writes ``DIR/{steps,layers,channels,evals,layer_evals}.parquet``, ``config.json`` and
    ``run.json``.

    Each flush is appended as row groups; the files are complete once the run finishes (a
    diverged or cancelled run finishes too, with what it recorded).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        self._writers: dict[str, Any] = {}

    def start(self, meta: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(meta.get("config", {}), indent=2))
        self._write_run({**meta, "status": "running"})

    def write(self, records: Records) -> None:
        import pyarrow.parquet as pq

        for name, table in records.tables().items():
            if not table:
                continue
            t = to_arrow(table)
            if name not in self._writers:
                self._writers[name] = pq.ParquetWriter(self.out / f"{name}.parquet", t.schema)
            self._writers[name].write_table(t)

    def finish(self, summary: dict[str, Any]) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        self._write_run(summary)

    def _write_run(self, data: dict[str, Any]) -> None:
        tmp = self.out / "run.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.out / "run.json")


def read_parquet(out_dir: str | Path) -> Records:
    """Read back what ParquetSink wrote, as numpy columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rec = Records()
    for name in TABLES:
        path = Path(out_dir) / f"{name}.parquet"
        if not path.exists():
            continue
        t = pq.read_table(path)
        cols = {}
        for k in t.column_names:
            col = t.column(k).combine_chunks()
            if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
                cols[k] = channel_column([np.asarray(r, np.float32) for r in col.to_pylist()])
            else:
                cols[k] = col.to_numpy(zero_copy_only=False)
        setattr(rec, name, cols)
    return rec


def encode(records: Records, seq: int | None = None) -> bytes:
    """A batch of records as the ingest endpoint takes it (NaN becomes null)."""
    body: dict[str, Any] = {
        name: json_columns(table) for name, table in records.tables().items() if table
    }
    if seq is not None:
        body["seq"] = seq
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def alike_evaluations(batch: list[Records]) -> list[list[Records]]:
    """``batch`` cut into runs of consecutive flushes whose ``evals`` and ``layer_evals``
    tables have the same columns (or none), each to be posted as one. A script's evaluations
    differ in what they log; joined in one table they would be NaN where a flush lacks a
    column, and the server keeps the first value of a step: a NaN over a real one."""
    runs: list[list[Records]] = []
    have: list[frozenset[str] | None] = []
    for rec in batch:
        cols = [frozenset(t) if t else None for t in (rec.evals, rec.layer_evals)]
        if runs and all(a is None or b is None or a == b for a, b in zip(have, cols, strict=True)):
            runs[-1].append(rec)
            have = [a if a is not None else b for a, b in zip(have, cols, strict=True)]
        else:
            runs.append([rec])
            have = cols
    return runs


#: The header that carries a run's write token (server.keys): only whoever created a run may
#: post its records, status and heartbeats.
RUN_TOKEN_HEADER = "X-Run-Token"


class HttpSink:
    """A :class:`Sink` that posts to a server's ``/api/runs/{id}``; retries while it is busy or
    unreachable.

    Records go out from a background thread, so training never waits on the network: a post
    takes tens of milliseconds on a busy machine, and waiting for it at every flush cut a small
    model's speed by half or more. Batches written while a post is in flight go out together in
    the next one. While the server cannot be reached, batches wait (at most ``max_pending``;
    beyond that the oldest are dropped and counted in :attr:`dropped`) and sending is retried
    for ``patience`` seconds; a send that fails for good (or that the server refuses) is raised
    by the next ``write`` (or by ``finish``), so the run stops instead of training on with nobody
    listening. With ``heartbeat`` (seconds), an idle sink tells the server now and then that the
    run is alive, so that a script that dies leaves its run failed rather than running forever;
    ``alive()`` returning False (a hung script) stops the heartbeat. ``token``: the run's write
    token, which the server gave whoever created the run. Batches go out together up to
    ``max_body`` bytes per post; a server that takes less (a 413) gets them in smaller posts.
    ``sequenced``: number the batches, so that a retried post is stored once (False for a
    second writer of a run, a data-parallel script's rank k > 0: the numbers are the first's).
    ``on_ack``: called (on the sink's thread) with each batch's acknowledgement, the server's
    JSON answer: ``{"seq", "stored", "diagnoses"}``, the last what the BN doctor made of it.
    """

    def __init__(
        self,
        client: httpx.Client,
        run_id: str,
        retries: int = 6,
        patience: float = 0.0,
        max_pending: int = 1000,
        heartbeat: float | None = None,
        alive: Callable[[], bool] | None = None,
        token: str | None = None,
        max_body: int = 4 * 2**20,
        sequenced: bool = True,
        on_ack: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.client, self.run_id, self.seq, self.retries = client, run_id, 0, retries
        self.on_ack = on_ack
        self.max_body = max_body
        self.sequenced = sequenced
        self._headers = {RUN_TOKEN_HEADER: token} if token else {}
        self.patience, self.max_pending = patience, max_pending
        self.heartbeat, self.alive = heartbeat, alive
        self.dropped = 0  # batches dropped while the server was unreachable
        self._pending: list[Records] = []
        self._meta: bytes | None = None
        self._sending = False
        self._closed = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name="bnscope-sink", daemon=True)
        self._thread.start()

    def post(self, path: str, content: bytes) -> httpx.Response:
        """POST to the run's ``path``: retried on a transport error or a 5xx, ``retries``
        times or for ``patience`` seconds, whichever is longer; a 4xx is raised at once. The
        answer."""
        deadline = time.monotonic() + self.patience
        attempt = 0
        while True:
            try:
                r = self.client.post(
                    f"/api/runs/{self.run_id}/{path}",
                    content=content,
                    headers={"content-type": "application/json", **self._headers},
                )
            except httpx.TransportError:
                r = None
            if r is not None and r.status_code < 400:
                return r
            if r is not None and r.status_code < 500:  # our mistake: retrying will not help
                raise Refused(f"POST {path}: {r.status_code} {error_message(r)}", r.status_code)
            attempt += 1
            if attempt >= self.retries and time.monotonic() >= deadline:
                if r is None:
                    raise ConnectionError(f"POST {path}: the server cannot be reached")
                r.raise_for_status()
            time.sleep(min(0.2 * 2 ** min(attempt, 5), 5.0))

    def start(self, meta: dict[str, Any]) -> None:
        self.post("status", orjson.dumps({"status": "running", "meta": meta}))

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Report the run running with ``meta``, from the background thread, before any
        records written after this call."""
        with self._cond:
            self._raise_if_failed()
            self._meta = orjson.dumps({"status": "running", "meta": meta})
            self._cond.notify_all()

    def write(self, records: Records) -> None:
        with self._cond:
            self._raise_if_failed()
            if self._closed:
                raise RuntimeError("write after finish")
            self._pending.append(records)
            if len(self._pending) > self.max_pending:
                self._pending.pop(0)
                self.dropped += 1
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every record written so far is stored by the server."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._error or not (self._pending or self._sending or self._meta)
            )
            self._raise_if_failed()

    def finish(self, summary: dict[str, Any]) -> None:
        try:
            self.drain()
        finally:
            self._close()
        body = {k: summary.get(k) for k in ("status", "message", "final", "steps_done")}
        self.post("status", orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))

    def abandon(self) -> None:
        """Stop sending (what is pending is not sent); for a run that ends without a server."""
        with self._cond:
            self._pending = []
        self._close()

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"sending records failed: {self._error}") from self._error

    def _beat(self) -> None:
        if self.alive is not None and not self.alive():
            return
        with contextlib.suppress(httpx.HTTPError):  # the next records or heartbeat will tell
            self.client.post(
                f"/api/runs/{self.run_id}/heartbeat", headers=self._headers, timeout=5.0
            )

    def _send(self, batch: list[Records]) -> None:
        """Post ``batch`` (flushes, in order) in as few posts as fit in ``max_body``, and as
        its evaluation tables' columns allow (:func:`alike_evaluations`)."""
        for alike in alike_evaluations(batch):
            self._send_alike(alike)

    def _send_alike(self, batch: list[Records]) -> None:
        parts = [batch]
        while parts:
            part = parts.pop(0)
            body = encode(Records.concat(part), self.seq + 1 if self.sequenced else None)
            if len(body) > self.max_body and len(part) > 1:
                parts[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                continue
            try:
                answer = self.post("records", body)
            except Refused as exc:
                if exc.status != 413 or len(part) == 1:
                    raise
                self.max_body = min(self.max_body, len(body) // 2)  # the server takes less
                parts[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                continue
            self.seq += 1
            if self.on_ack is not None:
                self._acknowledged(answer)

    def _acknowledged(self, answer: httpx.Response) -> None:
        """Hand a batch's acknowledgement to ``on_ack``; what it cannot read is no failure of
        the run's."""
        try:
            ack = answer.json()
            if isinstance(ack, dict) and self.on_ack is not None:
                self.on_ack(ack)
        except Exception:
            log.warning("bnscope: could not read the acknowledgement of run %s's records",
                        self.run_id, exc_info=True)  # fmt: skip

    def _send_loop(self) -> None:
        last = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._pending or self._meta or self._closed, timeout=self.heartbeat
                )
                if not (self._pending or self._meta):
                    if self._closed:
                        return
                    if self.heartbeat is not None and time.monotonic() - last >= self.heartbeat:
                        beat = True
                    else:
                        continue
                else:
                    beat = False
                    batch, self._pending, self._sending = self._pending, [], True
                    meta, self._meta = self._meta, None
            if beat:
                self._beat()
                last = time.monotonic()
                continue
            try:
                if meta is not None:
                    self.post("status", meta)
                if batch:
                    self._send(batch)
                last = time.monotonic()
            except Exception as exc:  # kept for the training thread to raise
                with self._cond:
                    self._error, self._sending, self._pending = exc, False, []
                    self._cond.notify_all()
                return
            with self._cond:
                self._sending = False
                self._cond.notify_all()

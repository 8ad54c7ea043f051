"""A training run in its own process: the bncore engine, sending its records to the API.

The worker talks to the server only through the documented HTTP endpoints (the same ones a
user's own script would use): it reports ``running`` with the run's metadata, streams batches of
records, and reports how the run ended. It stops when cancelled, and when its parent server is
gone (it then has no one to report to).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from typing import Any

import httpx
import orjson

from bncore.records import Records
from server.views import json_columns

RETRIES = 6


def encode(records: Records, seq: int | None = None) -> bytes:
    """A batch of records as the ingest endpoint takes it (NaN becomes null)."""
    body: dict[str, Any] = {
        name: json_columns(table) for name, table in records.tables().items() if table
    }
    if seq is not None:
        body["seq"] = seq
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


class HttpSink:
    """bncore.records.Sink that posts to ``/api/runs/{id}``; retries while the server is busy.

    Records go out from a background thread, so training never waits on the network: a post
    takes tens of milliseconds on a busy machine, and waiting for it at every flush cut a
    small model's speed by half or more. Batches written while a post is in flight go out
    together in the next one. A send that fails for good is raised by the next ``write`` (or by
    ``finish``), so the run stops instead of training on with nobody listening.
    """

    def __init__(self, client: httpx.Client, run_id: str, retries: int = RETRIES) -> None:
        self.client, self.run_id, self.seq, self.retries = client, run_id, 0, retries
        self._pending: list[Records] = []
        self._sending = False
        self._closed = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name="bnscope-sink", daemon=True)
        self._thread.start()

    def _post(self, path: str, content: bytes) -> None:
        for attempt in range(self.retries):
            try:
                r = self.client.post(
                    f"/api/runs/{self.run_id}/{path}",
                    content=content,
                    headers={"content-type": "application/json"},
                )
            except httpx.TransportError:
                if attempt == self.retries - 1:
                    raise
            else:
                if r.status_code < 400:
                    return
                if r.status_code < 500:  # our mistake: retrying will not help
                    raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:500]}")
                if attempt == self.retries - 1:
                    r.raise_for_status()
            time.sleep(0.2 * 2**attempt)

    def start(self, meta: dict[str, Any]) -> None:
        self._post("status", orjson.dumps({"status": "running", "meta": meta}))

    def write(self, records: Records) -> None:
        with self._cond:
            self._raise_if_failed()
            if self._closed:
                raise RuntimeError("write after finish")
            self._pending.append(records)
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every record written so far is stored by the server."""
        with self._cond:
            self._cond.wait_for(lambda: self._error or not (self._pending or self._sending))
            self._raise_if_failed()

    def finish(self, summary: dict[str, Any]) -> None:
        try:
            self.drain()
        finally:
            self._close()
        body = {k: summary.get(k) for k in ("status", "message", "final", "steps_done")}
        self._post("status", orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"sending records failed: {self._error}") from self._error

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                batch, self._pending, self._sending = self._pending, [], True
            try:
                self.seq += 1
                self._post("records", encode(Records.concat(batch), self.seq))
            except Exception as exc:  # kept for the training thread to raise
                with self._cond:
                    self._error, self._sending, self._pending = exc, False, []
                    self._cond.notify_all()
                return
            with self._cond:
                self._sending = False
                self._cond.notify_all()


def main(
    run_id: str, config_json: str, api_url: str, token: str | None, threads: int, cancel: Any
) -> None:
    """Process entry point (spawned by server.scheduler)."""
    import torch

    from bncore.config import RunConfig
    from bncore.engine import Trainer

    torch.set_num_threads(threads)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    parent = os.getppid()
    with httpx.Client(base_url=api_url, headers=headers, timeout=30.0) as client:
        sink = HttpSink(client, run_id)
        try:
            trainer = Trainer(RunConfig.model_validate_json(config_json))
            trainer.run(
                sink,
                should_stop=lambda: cancel.is_set() or os.getppid() != parent,
                flush_every=200,
                flush_seconds=0.05,
            )
        except Exception as exc:
            if os.getppid() != parent:
                return  # the server is gone: nobody to tell
            message = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(httpx.HTTPError, OSError):
                sink._post(
                    "status",
                    orjson.dumps(
                        {
                            "status": "failed",
                            "message": message[:2000],
                            "traceback": traceback.format_exc()[-4000:],
                        }
                    ),
                )
            raise SystemExit(1) from None

"""A training run in its own process: the bncore engine, sending its records to the API.

The worker talks to the server only through the documented HTTP endpoints (the same ones a
user's own script would use): it reports ``running`` with the run's metadata, streams batches of
records, and reports how the run ended. It stops when cancelled, and when its parent server is
gone (it then has no one to report to).
"""

from __future__ import annotations

import contextlib
import os
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
    """bncore.records.Sink that posts to ``/api/runs/{id}``; retries while the server is busy."""

    def __init__(self, client: httpx.Client, run_id: str) -> None:
        self.client, self.run_id, self.seq = client, run_id, 0

    def _post(self, path: str, content: bytes) -> None:
        for attempt in range(RETRIES):
            try:
                r = self.client.post(
                    f"/api/runs/{self.run_id}/{path}",
                    content=content,
                    headers={"content-type": "application/json"},
                )
            except httpx.TransportError:
                if attempt == RETRIES - 1:
                    raise
            else:
                if r.status_code < 400:
                    return
                if r.status_code < 500:  # our mistake: retrying will not help
                    raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:500]}")
                if attempt == RETRIES - 1:
                    r.raise_for_status()
            time.sleep(0.2 * 2**attempt)

    def start(self, meta: dict[str, Any]) -> None:
        self._post("status", orjson.dumps({"status": "running", "meta": meta}))

    def write(self, records: Records) -> None:
        self.seq += 1
        self._post("records", encode(records, self.seq))

    def finish(self, summary: dict[str, Any]) -> None:
        body = {k: summary.get(k) for k in ("status", "message", "final", "steps_done")}
        self._post("status", orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))


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

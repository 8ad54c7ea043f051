"""A training run in its own process: the bncore engine, sending its records to the API.

The worker talks to the server only through the documented HTTP endpoints (the same ones a
user's own script would use): it reports ``running`` with the run's metadata, streams batches of
records, and reports how the run ended. It stops when cancelled, and when its parent server is
gone (it then has no one to report to).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any

import httpx
import orjson

from bncore.sinks import HttpSink


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
                sink.post(
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

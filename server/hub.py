"""Live records: each run's batches go to whoever is listening, and the recent ones are kept so a
client that reconnects (SSE Last-Event-ID) gets what it missed."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

RECENT = 2000  # batches kept per run for reconnecting clients


@dataclass
class Event:
    """One server-sent event: ``records`` (a batch, id = its sequence number), ``status``."""

    kind: str
    seq: int
    data: dict[str, Any]


@dataclass
class _Channel:
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=RECENT))
    listeners: set[asyncio.Queue[Event]] = field(default_factory=set)


class Hub:
    """Publish/subscribe per run. Listeners live in the event loop; publish may be called from
    any thread."""

    def __init__(self) -> None:
        self._runs: dict[str, _Channel] = defaultdict(_Channel)
        self.loop: asyncio.AbstractEventLoop | None = None

    def publish(self, run_id: str, event: Event) -> None:
        try:
            in_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            in_loop = False
        if in_loop or self.loop is None:
            self._publish(run_id, event)
        else:
            self.loop.call_soon_threadsafe(self._publish, run_id, event)

    def _publish(self, run_id: str, event: Event) -> None:
        ch = self._runs[run_id]
        if event.kind == "records":
            ch.recent.append(event)
        for q in list(ch.listeners):
            q.put_nowait(event)

    def subscribe(self, run_id: str, after: int | None) -> tuple[asyncio.Queue[Event], list[Event]]:
        """A queue of future events, and the kept batches after sequence number ``after``."""
        ch = self._runs[run_id]
        q: asyncio.Queue[Event] = asyncio.Queue()
        ch.listeners.add(q)
        missed = [] if after is None else [e for e in ch.recent if e.seq > after]
        return q, missed

    def unsubscribe(self, run_id: str, q: asyncio.Queue[Event]) -> None:
        ch = self._runs.get(run_id)
        if ch is not None:
            ch.listeners.discard(q)

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

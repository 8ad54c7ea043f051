"""Live records: each run's batches go to whoever is listening, and the recent ones are kept so a
client that reconnects (SSE Last-Event-ID) gets what it missed."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson
from sse_starlette.event import ServerSentEvent

RECENT = 2000  # batches kept per run for reconnecting clients, at most
RECENT_BYTES = 8 * 2**20  # and at most this much of them (as sent) per run
BEHIND = 500  # events a listener may lag behind; beyond, its stream ends (it reconnects)


@dataclass
class Event:
    """One server-sent event: ``records`` (a batch, id = its sequence number), ``status``."""

    kind: str
    seq: int
    data: dict[str, Any]

    @cached_property
    def text(self) -> str:
        """The data as sent (JSON), made once however many listen."""
        return orjson.dumps(self.data, option=orjson.OPT_SERIALIZE_NUMPY).decode()

    @cached_property
    def wire(self) -> bytes:
        """The whole server-sent event, encoded once: encoding it per listener was a quarter
        of the server's time with 100 listeners (benchmarks/load.py)."""
        return ServerSentEvent(data=self.text, event=self.kind, id=str(self.seq)).encode()


#: Put in a listener's queue when it fell too far behind: its stream ends there.
GONE = Event("gone", -1, {})


@dataclass
class _Channel:
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_bytes: int = 0
    listeners: set[asyncio.Queue[Event]] = field(default_factory=set)


class Hub:
    """Publish/subscribe per run. Listeners live in the event loop; publish may be called from
    any thread."""

    def __init__(self) -> None:
        self._runs: dict[str, _Channel] = defaultdict(_Channel)
        self.loop: asyncio.AbstractEventLoop | None = None

    def publish(self, run_id: str, event: Event) -> None:
        self._in_loop(self._publish, run_id, event)

    def publish_ended(self, run_id: str) -> None:
        """After the run's final status: drop what was kept of it (see :meth:`ended`)."""
        self._in_loop(self.ended, run_id)

    def _in_loop(self, fn: Any, *args: Any) -> None:
        """Call ``fn`` in the event loop, from whatever thread."""
        try:
            in_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            in_loop = False
        if in_loop or self.loop is None:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _publish(self, run_id: str, event: Event) -> None:
        ch = self._runs[run_id]
        if event.kind == "records":
            if len(ch.recent) == ch.recent.maxlen:
                ch.recent_bytes -= len(ch.recent[0].text)
            ch.recent.append(event)
            ch.recent_bytes += len(event.text)
            while ch.recent_bytes > RECENT_BYTES and len(ch.recent) > 1:
                ch.recent_bytes -= len(ch.recent.popleft().text)
        for q in list(ch.listeners):
            if q.qsize() >= BEHIND:  # a client that cannot keep up costs memory, not others
                ch.listeners.discard(q)
                q.put_nowait(GONE)
            else:
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

    def ended(self, run_id: str) -> None:
        """The run is over: what was kept for reconnecting clients goes (they reload)."""
        ch = self._runs.get(run_id)
        if ch is not None:
            ch.recent.clear()
            ch.recent_bytes = 0
            if not ch.listeners:
                self._runs.pop(run_id, None)

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

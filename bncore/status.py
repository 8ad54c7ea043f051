"""What state a run is in: the one list of run statuses, used by the trainer, the store, the API
schemas, the service and (exported into the page) the dashboard's script."""

from __future__ import annotations

from enum import Enum


class RunStatus(str, Enum):
    """A run's status. ``queued`` and ``running`` are active; the others are final."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"  # the loss became NaN or infinite; records kept up to then
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the server stopped while it trained

    def __str__(self) -> str:
        return self.value


#: Plain strings, so that a status read back from the database compares and hashes alike.
ACTIVE: tuple[str, ...] = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
FINISHED: tuple[str, ...] = tuple(s.value for s in RunStatus if s.value not in ACTIVE)
#: What a run's worker or script may report of itself (the server sets queued and interrupted).
REPORTED: tuple[str, ...] = ("running", "completed", "diverged", "failed", "cancelled")

"""What can go wrong in a request, said in the domain's words: the service raises these, the API
turns them into HTTP answers (server.app) and the dashboard into messages.

``detail`` is what the caller is told: a sentence that says what to fix; ``message`` is that in
one line. A sweep's errors are typed (:class:`UnknownSweepField`, :class:`InvalidGridPoint`), so
that a caller can put each beside what it is about without reading the sentence.

Over HTTP every 4xx has one shape (:func:`error_body`)::

    {"message": "<one line: what to fix>", "detail": [{"field": "<dotted field or ''>",
                                                       "message": "..."}, ...]}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bncore.run.config import summarize

#: What a request whose body is not a JSON object is told (no body, another content type, a list).
BODY_NOT_OBJECT = "send the body as a JSON object with Content-Type: application/json"


#: Errors one answer lists at most; the rest are counted (a body of 100,000 unknown keys is
#: answered with 20 of them, at the cost of 20).
MAX_LISTED = 20


def error_body(
    errors: Iterable[dict[str, Any]], message: str | None = None, more: int = 0
) -> dict[str, Any]:
    """The API's answer to a refused request: ``errors`` (each with ``field`` and ``message``,
    perhaps more), at most MAX_LISTED of them, and one line for a person (by default, the errors
    in one line), which counts those left out (``more``: left out by the caller already)."""
    detail: list[dict[str, Any]] = []
    for e in errors:
        if len(detail) == MAX_LISTED:
            more += 1
            continue
        detail.append({**e, "field": e.get("field") or "", "message": str(e["message"])})
    if message is None:
        message = summarize((e["field"], e["message"]) for e in detail)
    if more:
        message = f"{message}; and {more} more errors (the first {len(detail)} are listed)"
    return {"message": message, "detail": detail}


class DomainError(Exception):
    """A request the service refuses; ``status`` is the HTTP status it maps to (a subclass names
    its own: ``class NotFound(DomainError, status=404)``); ``field``, the dotted config field or
    parameter it is about, where there is one."""

    status = 400

    def __init_subclass__(cls, status: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status

    def __init__(self, detail: Any, field: str = "") -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail
        self.field = field

    @property
    def message(self) -> str:
        """One line for a person (the dashboard's banner, the API's ``message``)."""
        return str(self.detail)

    def errors(self) -> list[dict[str, Any]]:
        """One entry per field it is about (``field``, ``message``)."""
        return [{"field": self.field, "message": self.message}]

    def body(self) -> dict[str, Any]:
        """The API's answer (:func:`error_body`)."""
        return error_body(self.errors(), self.message)


class BadRequest(DomainError):
    """A parameter that names nothing here (an unknown statistic or layer, a bad range)."""


class NotRunnable(DomainError):
    """The config is valid but this server cannot run it (no CUDA, no such data directory)."""


class Unauthorized(DomainError, status=401):
    """A change (or, with ``--protect-reads``, a read) without this server's token."""


class Forbidden(DomainError, status=403):
    """The caller is not the one who may do this (another run's records or status)."""


class NotFound(DomainError, status=404):
    """Nothing by that id, key or step here (a run, a sweep, an experiment, a kept step)."""


class Conflict(DomainError, status=409):
    """The run or sweep is not in a state that allows this (ended, still training, ...)."""


class TooLarge(DomainError, status=413):
    """More than this server lets one run keep (its records, over ``--max-run-disk``)."""


class Busy(DomainError, status=429):
    """The server holds as much as it takes (the queue is full): try again later."""


class Invalid(DomainError, status=422):
    """The input is well-formed JSON but says something that cannot be (a sweep, a batch)."""


class UnknownSweepField(Invalid):
    """A sweep varies a field that a run config cannot hold (``field``: the sweep's key)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"sweep key {reason}", field)


class InvalidGridPoint(Invalid):
    """One point of a sweep makes a config that does not validate: ``point`` (its values, as
    ``a=1, b=2``) and ``field_errors`` ((dotted field, message) pairs)."""

    def __init__(self, point: str, field_errors: list[tuple[str, str]]) -> None:
        self.point, self.field_errors = point, field_errors
        super().__init__(f"grid point {point}: {summarize(field_errors)}")

    def errors(self) -> list[dict[str, Any]]:
        return [{"field": f, "message": m, "point": self.point} for f, m in self.field_errors]

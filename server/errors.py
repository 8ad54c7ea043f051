"""What can go wrong in a request, said in the domain's words: the service raises these, the API
turns them into HTTP answers (server.app) and the dashboard into messages.

``detail`` is what the caller is told: a sentence that says what to fix, or, for a sweep point
that fails validation, ``{"point": ..., "errors": [{"field", "message"}]}``.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A request the service refuses; ``status`` is the HTTP status it maps to."""

    status = 400

    def __init__(self, detail: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail

    @property
    def message(self) -> str:
        """One line for a person (the dashboard's banner)."""
        if isinstance(self.detail, dict) and "point" in self.detail:
            fields = "; ".join(f"{e['field']}: {e['message']}" for e in self.detail["errors"])
            return f"grid point {self.detail['point']}: {fields}"
        return str(self.detail)


class BadRequest(DomainError):
    """A parameter that names nothing here (an unknown statistic or layer, a bad range)."""

    status = 400


class NotRunnable(DomainError):
    """The config is valid but this server cannot run it (no CUDA, no such data directory)."""

    status = 400


class Unauthorized(DomainError):
    status = 401


class NotFound(DomainError):
    status = 404


class Conflict(DomainError):
    """The run or sweep is not in a state that allows this (ended, still training, ...)."""

    status = 409


class Invalid(DomainError):
    """The input is well-formed JSON but says something that cannot be (a sweep, a batch)."""

    status = 422

"""Per-run write tokens: whoever creates a run (the server's worker for a run it trains, the
script for a run it reports) gets a secret that its records, status and heartbeats must carry
(header ``X-Run-Token``); the store keeps only its SHA-256."""

from __future__ import annotations

import hashlib
import secrets

from bncore.record.sinks import RUN_TOKEN_HEADER as HEADER

__all__ = ["HEADER", "digest", "matches", "mint"]


def mint() -> tuple[str, str]:
    """A new token and the digest to store for it."""
    token = secrets.token_urlsafe(24)
    return token, digest(token)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def matches(stored: str | None, given: str | None) -> bool:
    """Whether ``given`` is the token whose digest is ``stored`` (never for a run without one)."""
    if not stored or not given:
        return False
    return secrets.compare_digest(digest(given.strip()), stored)

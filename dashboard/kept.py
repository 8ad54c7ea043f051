"""Dash's scripts, kept in memory gzipped. Dash serves its scripts (React, its renderer, the
components: 1.2 MB) through Flask, uncompressed, reading each file again on every request. The
scripts whose address names their version (Dash's fingerprinted ``*.v4_4_1m….js``, cached for
a year) never change while the server runs: :class:`KeptScripts` keeps each one gzipped from
its first request on, and answers later requests from memory, without Flask: a cold page
fetches 1.15 MB instead of 2.1 MB (what a remote browser waits for; on loopback the time to the
first screen did not change measurably)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Where Dash serves its scripts: nothing else is looked at (nor held while it is answered).
SCRIPTS = "/_dash-component-suites/"
#: What Dash answers a fingerprinted address with: it never changes (dash.fingerprint).
FOR_GOOD = "max-age=31536000"
#: Headers of the kept answer that say what it is; the rest (length, date) are set anew.
KEPT_HEADERS = ("content-type", "cache-control")


@dataclass(frozen=True)
class Kept:
    """One script as sent: its headers, its bytes and its gzipped bytes."""

    headers: tuple[tuple[str, str], ...]
    body: bytes
    gzipped: bytes


class KeptScripts:
    """ASGI middleware around Dash's app: a GET whose answer is cached for good (``FOR_GOOD``)
    is kept, gzipped, and later answered from memory; anything else passes through untouched.
    Memory is bounded by Dash's own files: only its fingerprinted addresses are kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.kept: dict[str, Kept] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or SCRIPTS not in scope["path"]:
            await self.app(scope, receive, send)  # not held: the layout, callbacks, assets
            return
        key = scope["path"] + "?" + scope.get("query_string", b"").decode("latin-1")
        kept = self.kept.get(key)
        if kept is None:
            kept = await self._first(scope, receive, send, key)
            if kept is None:
                return
        await _answer(kept, Headers(scope=scope), send)

    async def _first(self, scope: Scope, receive: Receive, send: Send, key: str) -> Kept | None:
        """The inner app's answer: kept (and returned) if it is cached for good; else sent as
        it came, and None."""
        messages: list[Message] = []

        async def hold(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, hold)
        start = messages[0] if messages else {}
        headers = Headers(raw=start.get("headers", []))
        if (
            start.get("type") == "http.response.start"
            and start.get("status") == 200
            and FOR_GOOD in headers.get("cache-control", "")
            and "content-encoding" not in headers
        ):
            body = b"".join(m.get("body", b"") for m in messages[1:])
            kept = Kept(
                tuple((k, headers[k]) for k in KEPT_HEADERS if k in headers),
                body,
                gzip.compress(body, compresslevel=6, mtime=0),
            )
            self.kept[key] = kept
            return kept
        for message in messages:
            await send(message)
        return None


async def _answer(kept: Kept, request: Headers, send: Send) -> None:
    """``kept``, gzipped where the request accepts it."""
    zipped = "gzip" in request.get("accept-encoding", "")
    body = kept.gzipped if zipped else kept.body
    headers = MutableHeaders(raw=[(k.encode(), v.encode()) for k, v in kept.headers])
    headers["content-length"] = str(len(body))
    headers["vary"] = "accept-encoding"
    if zipped:
        headers["content-encoding"] = "gzip"
    await send({"type": "http.response.start", "status": 200, "headers": headers.raw})
    await send({"type": "http.response.body", "body": body})

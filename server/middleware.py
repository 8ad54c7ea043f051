"""ASGI middleware of the API: what every request passes before any route sees it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import Invalid, error_body

#: Keys one object of a request body may have: far more than any body of the API needs (a
#: run's config has about 60 fields; a model's BN layers are a few hundred), few enough that
#: checking each of them is cheap.
MAX_KEYS = 4096


def read_json(body: bytes) -> Any:
    """A request body parsed as JSON, refused (Invalid, a 422) where an object has more than
    MAX_KEYS keys or a text holds NUL (which PostgreSQL cannot store): in time linear in its
    size, for a caller to run off the event loop. ``json.JSONDecodeError`` where it is no JSON."""
    value = json.loads(body, object_pairs_hook=_object)
    if b"\\u0000" in body:  # NUL is written so in JSON; only then is every text looked at
        where = _nul_at(value)
        if where is not None:
            raise Invalid(
                "text may not hold the NUL character (\\u0000): remove it", field=where or ""
            )
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_KEYS:
        raise Invalid(
            f"an object of the body has {len(pairs)} keys; at most {MAX_KEYS} are read "
            f"(its first: {', '.join(k for k, _ in pairs[:3])}...)"
        )
    return dict(pairs)


def _nul_at(value: Any) -> str | None:
    """The dotted path of the first text (a key or a value) holding NUL, or None."""
    todo: list[tuple[Any, str]] = [(value, "")]
    while todo:
        item, path = todo.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path
        elif isinstance(item, dict):
            for k, v in item.items():
                where = f"{path}.{k}" if path else str(k)
                if "\x00" in k:
                    return where
                todo.append((v, where))
        elif isinstance(item, list):
            todo.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(item))
    return None


#: The cookie a browser keeps the token in, once it opened a page with ``?token=...``.
COOKIE = "bnscope_token"


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        await _refuse(send, 413, f"request body larger than {self.limit} bytes")


class _TooLarge(Exception):
    pass


class NoNul:
    """422 for a path or query that holds NUL (``%00``): no text of the store may hold it
    (PostgreSQL refuses it, a 5xx otherwise); bodies: :func:`read_json`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")
        ):
            return await _refuse(
                send, 422, "the path or query holds the NUL character (%00): remove it"
            )
        return await self.app(scope, receive, send)


class ReadGuard:
    """``--protect-reads``: every request but ``/healthz`` carries the server's token, as
    ``Authorization: Bearer <token>`` (the API), or in the cookie a browser is given when it
    opens a page once with ``?token=<token>`` (the dashboard, its callbacks and live stream).
    The cookie never counts for changes: those still need the header (no cross-site writes)."""

    def __init__(self, app: ASGIApp, accepts: Callable[[str | None], bool]) -> None:
        self.app, self.accepts = app, accepts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.accepts(bearer):
            return await self.app(scope, receive, send)
        if self.accepts(cookie_parser(headers.get("cookie", "")).get(COOKIE)):
            return await self.app(scope, receive, send)
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        if not self.accepts(given):
            return await _refuse(
                send,
                401,
                "this server protects reads: send 'Authorization: Bearer <token>', or open the "
                "dashboard once as /dashboard/?token=<token>",
                [(b"www-authenticate", b"Bearer")],
            )
        cookie = f"{COOKIE}={given}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, with_cookie)


async def _refuse(
    send: Send, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer in the API's one shape of a refusal (server.errors.error_body)."""
    body = json.dumps(error_body([{"field": "", "message": message}])).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

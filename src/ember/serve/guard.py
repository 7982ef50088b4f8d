"""ASGI plumbing around the API: the bearer token and the request size limit.

Both are a plain ASGI middleware in front of everything (the API, its
OpenAPI schema, /docs, /metrics, WebSockets), so no route can forget them.
The token is compared in constant time; a body is counted as it arrives, so
a chunked upload cannot slip past the limit that Content-Length states.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class TooLarge(Exception):
    pass


async def _reply(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Bearer-token authentication and a cap on request bodies."""

    def __init__(self, app: ASGIApp, *, token: str, max_body: int) -> None:
        self.app = app
        self._token = f"Bearer {token}".encode()
        self.max_body = max_body

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        return hmac.compare_digest(given, self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401})
            else:
                await _reply(send, 401, "unauthorized", "a valid bearer token is required")
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _reply(send, 413, "payload_too_large",
                         f"request bodies are limited to {self.max_body} bytes")  # fmt: skip
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except TooLarge:
            if not started:
                await _reply(send, 413, "payload_too_large",
                             f"request bodies are limited to {self.max_body} bytes")  # fmt: skip


def json_lines(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"

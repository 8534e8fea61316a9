"""Pure ASGI middleware that runs before any body is read: API-key check and body-size limit.

Pure ASGI rather than ``BaseHTTPMiddleware`` so streaming responses pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graphrt.serve.errors import APIError, error_bytes

# Paths that need the API key; /health and /metrics stay open for probes and scrapers.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


async def _send_error(send: Send, status: int, message: str, code: str, extra=()) -> None:
    body = error_bytes(status, message, code=code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Refuse protected paths without ``Authorization: Bearer <key>`` (401)."""

    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[int], None]) -> None:
        self.app = app
        self._expected = b"Bearer " + api_key.encode()
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        # Constant-time, so the key cannot be guessed byte by byte from response times.
        if not hmac.compare_digest(given, self._expected):
            self._on_reject(401)
            message = "invalid API key" if given else "missing API key (Authorization: Bearer)"
            await _send_error(
                send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")]
            )
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413: at once when Content-Length says so, else as
    soon as the streamed body crosses the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[int], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._on_reject = on_reject

    def _message(self) -> str:
        return (
            f"request body is larger than the server limit max_request_body_bytes={self.max_bytes}"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    self._on_reject(400)
                    await _send_error(send, 400, "invalid Content-Length header", "bad_request")
                    return
                if int(value) > self.max_bytes:
                    self._on_reject(413)
                    await _send_error(send, 413, self._message(), "request_too_large")
                    return
                break
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the handler's body read; the APIError handler answers 413.
                    raise APIError(413, self._message(), code="request_too_large")
            return message

        await self.app(scope, limited_receive, send)

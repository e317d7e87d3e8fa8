"""Request body size limit as pure ASGI middleware: it counts the bytes it receives, so the limit holds for
`Transfer-Encoding: chunked` bodies too (a Content-Length check alone let a 100 MB chunked body through).

A body is read into memory up to the limit, then handed to the app in one message; one byte over the
limit and the client gets 413 at once, with nothing more read (the connection is then closed).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: Callable[[Scope], int | None]) -> None:
        self.app = app
        self.max_bytes = max_bytes  # read per request: settings may change between test apps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" not in headers:  # no body (GET, SSE): nothing to count
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes(scope)
        if limit is None:  # a route that streams its body and enforces its own limit (file uploads)
            await self.app(scope, receive, send)
            return
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(send, limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return body
            return await receive()  # afterwards: http.disconnect when the client goes

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    payload = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),  # the rest of the body is never read
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})

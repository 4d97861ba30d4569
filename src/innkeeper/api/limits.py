"""Request size limits, as a plain ASGI middleware.

The cap is enforced while the body is read, not only from Content-Length, so a chunked
upload (no Content-Length) cannot stream gigabytes into memory either. Pure ASGI (not
BaseHTTPMiddleware) so streaming responses and disconnect detection pass through.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from innkeeper.api.security import header, send_error


def too_large_message(limit: int) -> str:
    return (
        f"the request body is larger than this server accepts ({limit} bytes); "
        "send a shorter prompt, or start the server with a larger --max-body"
    )


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the body passes the cap; the app's handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


class BodyLimitMiddleware:
    """413 for bodies over `max_body` bytes: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, *, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        declared = header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await send_error(scope, send, 413, too_large_message(limit), "invalid_request_error")
            return

        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            # Read outside a route (where no handler turns it into a response).
            if started:
                raise
            await send_error(scope, send, 413, too_large_message(limit), "invalid_request_error")

"""API-key checking as a plain ASGI middleware.

A pure ASGI layer (not Starlette's BaseHTTPMiddleware) so streaming responses and the
client-disconnect signal that cancels generations pass through untouched.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from innkeeper.api.errors import error_body

# Routes a client calls without a key: health checks, the web page's files, and the calls
# SillyTavern makes without an Authorization header (KoboldCpp's abort and version checks).
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/health",
        "/favicon.ico",
        "/api/extra/abort",
        "/api/extra/version",
        "/api/v1/info/version",
        "/api/latest/info/version",
    }
)
PUBLIC_PREFIXES = ("/static/",)


def key_matches(presented: str, keys: Iterable[str]) -> bool:
    """Constant-time comparison against every configured key."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


def presented_key(scope: Scope) -> str:
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k for k in keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if (
            scope.get("method") == "OPTIONS"
            or path in PUBLIC_PATHS
            or path.startswith(PUBLIC_PREFIXES)
            or key_matches(presented_key(scope), self.keys)
        ):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            error_body(
                path,
                401,
                "missing or invalid API key (send Authorization: Bearer <key>)",
                "authentication_error",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

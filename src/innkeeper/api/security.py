"""Who may talk to the server: API keys, Host names and browser origins.

Pure ASGI layers (not Starlette's BaseHTTPMiddleware) so streaming responses and the
client-disconnect signal that cancels generations pass through untouched.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from innkeeper.api.errors import error_body
from innkeeper.config import is_loopback

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


async def send_error(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    type_: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer from a middleware, in the error shape of the route family asked."""
    body = json.dumps(error_body(scope.get("path", ""), status, message, type_)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


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
        await send_error(
            scope,
            send,
            401,
            "missing or invalid API key (send Authorization: Bearer <key>)",
            "authentication_error",
            [(b"www-authenticate", b"Bearer")],
        )


def host_name(value: str) -> str:
    """`name:port`, `[v6]:port` or `name` -> the lower-case name without port or brackets."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        return v[1:end] if end > 0 else v
    if v.count(":") == 1:
        v = v.split(":", 1)[0]
    return v.rstrip(".")


class HostGuardMiddleware:
    """DNS-rebinding and cross-site request protection for a server nobody else should reach.

    Bound to loopback (`check_host`), a request must be addressed to a loopback name, the
    bound host or an `--allow-host` name: a web page whose domain an attacker re-points at
    127.0.0.1 still sends its own name in Host, and gets a 400. Without API keys
    (`check_origin`), a browser request from another site's page (its `Origin` names a
    different host) gets a 403 unless `--cors-origin` allows that origin, so a page cannot
    make the server generate or abort with a simple cross-site POST. Clients that are not
    browsers send no Origin and are not affected.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        bound_host: str,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        check_host: bool = True,
        check_origin: bool = True,
    ) -> None:
        self.app = app
        self.extra = {host_name(h) for h in allowed_hosts}
        self.names = {"localhost", host_name(bound_host), *self.extra}
        self.any_host = "*" in self.extra
        self.origins = {o.rstrip("/").lower() for o in cors_origins}
        self.check_host = check_host
        self.check_origin = check_origin and "*" not in self.origins

    def host_allowed(self, name: str) -> bool:
        return (
            self.any_host or name in self.names or is_loopback(name)
        )  # no DNS answer can point these elsewhere

    def origin_allowed(self, origin: str, host: str) -> bool:
        if origin.rstrip("/").lower() in self.origins:
            return True
        other = (urlsplit(origin).hostname or "").rstrip(".")
        return bool(other) and (other == host or other in self.extra)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_host = header(scope, b"host")
        host = host_name(raw_host) if raw_host is not None else ""
        if self.check_host and raw_host is not None and not self.host_allowed(host):
            await send_error(
                scope,
                send,
                400,
                f"unknown Host {host!r}: this server listens on loopback and answers only "
                "requests addressed to localhost (DNS-rebinding protection); start it with "
                f"--allow-host {host or 'NAME'} to accept this name",
                "invalid_request_error",
            )
            return
        origin = header(scope, b"origin")
        if self.check_origin and origin is not None and not self.origin_allowed(origin, host):
            await send_error(
                scope,
                send,
                403,
                f"cross-origin request from {origin!r} refused: start the server with "
                f"--cors-origin {origin} to let that page use it",
                "permission_error",
            )
            return
        await self.app(scope, receive, send)

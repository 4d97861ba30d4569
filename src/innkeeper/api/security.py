"""Who may talk to the server: API keys, Host names and browser origins.

Pure ASGI layers (not Starlette's BaseHTTPMiddleware) so streaming responses and the
client-disconnect signal that cancels generations pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from innkeeper.api.errors import error_body
from innkeeper.settings.server import is_loopback

log = logging.getLogger("innkeeper.api")

# Routes a client calls without a key: health checks, the web page's files, and the version
# checks SillyTavern makes without an Authorization header. The abort routes are not here:
# on a keyed server stopping someone's generation needs the key (SillyTavern's Stop also
# closes its stream, which stops the run without any route).
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/health",
        "/favicon.ico",
        "/api/extra/version",
        "/api/v1/info/version",
        "/api/latest/info/version",
    }
)
PUBLIC_PREFIXES = ("/static/",)
# Routes that stop generations: the Origin check applies to them even on a keyed server.
ABORT_PATHS = frozenset({"/api/extra/abort", "/v1/internal/stop-generation"})
# Pages served from this machine on any port may call the API by default, as Ollama allows:
# only software already running here can serve them.
LOOPBACK_ORIGIN_REGEX = r"http://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?"
HINT_INTERVAL = 30.0  # seconds between two "origin refused" log hints, whatever the origin


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


class OriginPolicy:
    """Which browser origins may call the API, compared as whole origins (scheme, host, port).

    Allowed: the server's own origin (the bound host and, on loopback, its loopback
    spellings at the server's port), the origin the request itself is addressed to once the
    Host check vouched for it, pages served from this machine on any port
    (`LOOPBACK_ORIGIN_REGEX`), and every `--cors-origin`.
    """

    def __init__(self, *, bound_host: str, port: int, cors_origins: Iterable[str] = ()) -> None:
        self.configured = {o.strip().rstrip("/").lower() for o in cors_origins}
        self.any = "*" in self.configured
        self.own = own_origins(bound_host, port)
        self.loopback = re.compile(LOOPBACK_ORIGIN_REGEX)

    def allowed(self, origin: str, addressed: str | None = None) -> bool:
        """`addressed` is `http://` + the request's Host, when the Host check passed it."""
        o = origin.strip().rstrip("/").lower()
        return (
            self.any
            or o in self.configured
            or o in self.own
            or o == addressed
            or self.loopback.fullmatch(o) is not None
        )


def own_origins(bound_host: str, port: int) -> set[str]:
    """The origins a browser gives a page served by this server itself."""
    names = {bound_host.strip().strip("[]").lower()}
    if is_loopback(bound_host):
        names |= {"127.0.0.1", "localhost", "::1"}
    out = set()
    for name in names:
        netloc = f"[{name}]" if ":" in name else name
        out.add(f"http://{netloc}:{port}")
        if port == 80:
            out.add(f"http://{netloc}")
    return out


class HostGuardMiddleware:
    """DNS-rebinding and cross-site request protection for a server nobody else should reach.

    Bound to loopback (`check_host`), a request must be addressed to a loopback name, the
    bound host or an `--allow-host` name: a web page whose domain an attacker re-points at
    127.0.0.1 still sends its own name in Host, and gets a 400. Without API keys
    (`check_origin`), a browser request whose `Origin` the `OriginPolicy` does not allow gets
    a 403, so a page cannot make the server generate or abort with a simple cross-site POST;
    the abort routes get that check on a keyed server too. Clients that are not browsers send
    no Origin and are not affected. A refused origin is logged with a hint naming
    `--cors-origin`, at most once every `HINT_INTERVAL` seconds.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        bound_host: str,
        port: int,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        check_host: bool = True,
        check_origin: bool = True,
    ) -> None:
        self.app = app
        self.extra = {host_name(h) for h in allowed_hosts}
        self.names = {"localhost", host_name(bound_host), *self.extra}
        self.any_host = "*" in self.extra
        self.origins = OriginPolicy(bound_host=bound_host, port=port, cors_origins=cors_origins)
        self.check_host = check_host
        self.check_origin = check_origin
        self.last_hint = -HINT_INTERVAL

    def host_allowed(self, name: str) -> bool:
        return (
            self.any_host or name in self.names or is_loopback(name)
        )  # no DNS answer can point these elsewhere

    def blind_cross_site(self, scope: Scope) -> bool:
        """A browser request from another site that carries no Origin (`<img src>`, a no-cors
        fetch): browsers mark it `Sec-Fetch-Site: cross-site`. Refused where the Origin check
        applies, except top-level navigations by GET (a link to the page) and with
        `--cors-origin *`."""
        if header(scope, b"sec-fetch-site") != "cross-site" or "*" in self.origins.configured:
            return False
        if not (self.check_origin or scope.get("path") in ABORT_PATHS):
            return False
        navigation = header(scope, b"sec-fetch-mode") == "navigate"
        return not (navigation and scope.get("method") in ("GET", "HEAD"))

    def hint(self, origin: str) -> None:
        """One log line that names the fix; rate-limited so refused pages cannot flood it."""
        now = time.monotonic()
        if now - self.last_hint < HINT_INTERVAL:
            return
        self.last_hint = now
        flag = origin if _PRINTABLE_ORIGIN.fullmatch(origin) else "ORIGIN"
        log.warning(
            "refused a browser page from %r (CORS): start innkeeper with --cors-origin %s "
            "to let it call the API",
            origin[:200],
            flag,
        )

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
        if origin is None and self.blind_cross_site(scope):
            await send_error(
                scope,
                send,
                403,
                "a request from another site's page without an Origin (an image or a no-cors "
                "fetch) is refused: such requests can never be told apart from an attack",
                "permission_error",
            )
            return
        if origin is not None:
            # Host names the origin the browser addressed; trusted once the Host check ran
            addressed = (
                f"http://{raw_host.strip().lower()}" if self.check_host and raw_host else None
            )
            if not self.origins.allowed(origin, addressed):
                self.hint(origin)
                if self.check_origin or scope.get("path") in ABORT_PATHS:
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


_PRINTABLE_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[A-Za-z0-9.\-\[\]:]{1,200}")

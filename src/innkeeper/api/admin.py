"""Who may change what the server has loaded: load, unload, pull and delete are admin actions.

With `--admin-key` set, such a request must carry one of the keys (`Authorization: Bearer KEY`
or `X-Admin-Key: KEY`). With none set, they are allowed on a loopback server only: anyone who
can reach a public server could otherwise swap its model or fill its disk.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import Request

from innkeeper.api.errors import ApiError
from innkeeper.api.security import key_matches
from innkeeper.serving.policy import Caller

# Marks an admin route in the OpenAPI document (routes pass it as `openapi_extra`): clients
# and fuzzers can tell the operations that change what the server has loaded.
ADMIN_OPENAPI: dict[str, object] = {"x-innkeeper-admin": True}


def presented_admin_keys(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Every key the request offers for admin use (the Bearer token and X-Admin-Key)."""
    out: list[str] = []
    for name, value in headers:
        name = name.lower()
        if name == "authorization" and value.strip().lower().startswith("bearer "):
            out.append(value.strip()[7:].strip())
        elif name == "x-admin-key":
            out.append(value.strip())
    return [k for k in out if k]


def admin_refusal(
    admin_keys: tuple[str, ...], loopback: bool, presented: list[str]
) -> tuple[int, str] | None:
    """Why an admin request is refused, as (status, message); None when it is allowed.

    A pure function, so the non-loopback rule is tested without binding a public address.
    """
    if admin_keys:
        if any(key_matches(k, admin_keys) for k in presented):
            return None
        return 401, (
            "this is an admin action (load, unload, pull, delete): send the server's "
            "--admin-key as Authorization: Bearer <key> or X-Admin-Key: <key>"
        )
    if loopback:
        return None
    return 403, (
        "loading, unloading, pulling and deleting models are refused on a server reachable "
        "from other machines unless it has an admin key: restart it with --admin-key KEY"
    )


def caller_of(request: Request) -> Caller:
    """Who the request is, for the admin rule the runtime enforces (serving/policy.py): an
    admin when the admin routes would accept it."""
    config = request.app.state.config
    refusal = admin_refusal(
        config.admin_keys, config.loopback, presented_admin_keys(request.headers.items())
    )
    return Caller(admin=refusal is None)


async def require_admin(request: Request) -> None:
    """FastAPI dependency for admin routes; the error uses the route family's shape."""
    config = request.app.state.config
    refusal = admin_refusal(
        config.admin_keys, config.loopback, presented_admin_keys(request.headers.items())
    )
    if refusal is not None:
        status, message = refusal
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        raise ApiError(status, message, "authentication_error", headers=headers)

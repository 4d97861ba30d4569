"""What a client may say about a load: per-load engine settings and Ollama's keep_alive."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from innkeeper.serving.errors import BadLoadRequest, ParamError, WorkerNotAllowed
from innkeeper.serving.policy import check_keep_alive
from innkeeper.settings import ConfigError, load

# The EngineConfig fields a load may set (what the registry reports a model's settings as).
LOAD_SETTINGS = load.LOAD_SETTINGS
KEEP_ALIVE_PATTERN = r"^(-?[0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?$"  # Ollama's: 30s, 5m, 1h, -1
_DURATION = re.compile(KEEP_ALIVE_PATTERN)


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or "30s"/"5m"/"1h"; negative keeps it forever.

    None leaves the server's --idle-unload in charge; a bad value is a 400.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ParamError(f"keep_alive must be seconds or a duration like 5m (got {value!r})")
    if isinstance(value, (int, float)):
        return check_keep_alive(float(value))
    m = _DURATION.fullmatch(str(value))
    if not m:
        raise ParamError(f"keep_alive must be seconds or a duration like 5m (got {value!r})")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]
    return float(m.group(1)) * scale


def parse_load_settings(
    raw: dict[str, Any] | None, *, strict: bool = True, allowed_rpc: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A client's load settings -> EngineConfig field values (settings/load.py: names,
    aliases and bounds from the declarations, JSON types taken strictly); BadLoadRequest
    names the setting at fault. RPC workers must be on loopback or in `allowed_rpc`."""
    try:
        out = load.parse_load_settings(raw, strict=strict)
    except ConfigError as exc:
        raise BadLoadRequest(str(exc)) from None
    check_workers_allowed(out.get("rpc", ()), allowed_rpc)
    return out


def is_loopback(host: str) -> bool:
    """`localhost` or a 127.x.x.x address, read as written: no name is looked up (a name
    that resolves to loopback today may not tomorrow)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_workers_allowed(endpoints: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    """A client's word must not make the server connect anywhere it likes: RPC workers given
    over HTTP are on loopback (where an SSH tunnel to a worker lands) or among the server's
    own --rpc workers. WorkerNotAllowed names the first other one."""
    for endpoint in endpoints:
        if endpoint not in allowed and not is_loopback(endpoint.rpartition(":")[0]):
            listed = f" ({', '.join(allowed)})" if allowed else ""
            raise WorkerNotAllowed(
                f"rpc: {endpoint} is not on loopback nor one of the server's --rpc "
                f"workers{listed}: a load over HTTP only reaches those (tunnel a remote "
                "worker to 127.0.0.1, or start the server with --rpc naming it)"
            )

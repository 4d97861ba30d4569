"""What a client may say about a load: per-load engine settings and Ollama's keep_alive."""

from __future__ import annotations

import re
from typing import Any

from innkeeper.serving.errors import BadLoadRequest, ParamError
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


def parse_load_settings(raw: dict[str, Any] | None, *, strict: bool = True) -> dict[str, Any]:
    """A client's load settings -> EngineConfig field values (settings/load.py: names,
    aliases and bounds from the declarations, JSON types taken strictly); BadLoadRequest
    names the setting at fault."""
    try:
        return load.parse_load_settings(raw, strict=strict)
    except ConfigError as exc:
        raise BadLoadRequest(str(exc)) from None

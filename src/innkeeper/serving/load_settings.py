"""What a client may say about a load: per-load engine settings and Ollama's keep_alive."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from innkeeper.engine.config import EngineConfig
from innkeeper.serving.errors import BadLoadRequest, ParamError
from innkeeper.serving.policy import check_keep_alive
from innkeeper.settings import ConfigError, parse_text, settings_of

log = logging.getLogger("innkeeper.registry")

# Per-load settings a client may give (the page, text-generation-webui `args`, llama-server).
LOAD_SETTINGS = ("ctx_size", "gpu_layers", "cache_type_k", "cache_type_v", "flash_attn", "parallel")
SETTING_ALIASES = {
    "n_ctx": "ctx_size",
    "max_seq_len": "ctx_size",
    "ctx-size": "ctx_size",
    "n_gpu_layers": "gpu_layers",
    "ngl": "gpu_layers",
    "gpu-layers": "gpu_layers",
    "flash-attn": "flash_attn",
    "n_parallel": "parallel",
    "np": "parallel",
}
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
    """Client load settings -> EngineConfig field values, parsed as the CLI parses them.

    Accepts the registry's names and the usual spellings of other servers (`n_ctx`,
    `n_gpu_layers`, `cache_type` for both K and V…); anything else is a 400 that lists what
    is accepted (a typo must not load silently with the defaults), unless not `strict`
    (text-generation-webui clients send their loader's other arguments too: ignored).
    """
    out: dict[str, Any] = {}
    specs = {f.name: spec for f, spec in settings_of(EngineConfig)}
    for key, value in (raw or {}).items():
        if value is None:
            continue
        name = SETTING_ALIASES.get(key, key)
        if name == "cache_type":
            out.setdefault("cache_type_k", value)
            out.setdefault("cache_type_v", value)
            continue
        if name not in LOAD_SETTINGS:
            if not strict:
                log.info("ignoring load argument %r", key)
                continue
            raise BadLoadRequest(
                f"unknown load setting {key!r}: use {', '.join(LOAD_SETTINGS)} (or cache_type)"
            )
        out[name] = value
    for name, value in list(out.items()):
        spec = specs[name]
        if isinstance(value, (list, dict)) or (isinstance(value, bool) and name != "flash_attn"):
            raise BadLoadRequest(f"{name}: expected a number or text, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadLoadRequest(f"{name}: {value} is not a number")
        try:
            if name == "flash_attn" and isinstance(value, bool):
                value = "on" if value else "off"
            if name == "gpu_layers" and isinstance(value, int) and value < 0:
                value = 999
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value) if spec.parse is not None else int(value)
            out[name] = parse_text(spec, value)
            if name in ("ctx_size", "parallel") and not isinstance(out[name], int):
                out[name] = int(out[name])
        except (ConfigError, ValueError) as exc:
            raise BadLoadRequest(f"{name}: {exc}") from None
    return out

"""ServerConfig: the HTTP knobs of `innkeeper serve`, holding the engine's `EngineConfig`.

Each field is declared once with `setting(...)` (default, CLI flags, help, checks); the `serve`
options are generated from these declarations and EngineConfig's (cli/serve.py). To add an HTTP
setting, add one field here and read it where it takes effect.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from innkeeper.engine.config import EngineConfig
from innkeeper.settings import ConfigError, check_fields, setting

__all__ = ["ConfigError", "EngineConfig", "ServerConfig"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
DEFAULT_MAX_BODY = 32 * 2**20  # KoboldCpp's cap; a 128k-token prompt is ~0.5 MiB of text
DEFAULT_SSE_PING = 10.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`32M`, `512KiB`, `1g` or plain bytes -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--max-body must be a size like 32M, 512K or 1048576 (got {text!r})")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def check_origin(origin: str) -> str:
    """A CORS origin is `*` or scheme://host[:port], nothing more (no path, no trailing /)."""
    value = origin.strip().rstrip("/")
    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ConfigError(
            f"--cors-origin must be an origin like http://localhost:8000, or * (got {origin!r})"
        )
    return f"{parts.scheme}://{parts.netloc.lower()}"


def check_plan_size(text: str) -> str:
    """`--ram`/`--vram` take what `fit` takes (hardware.parse_size, several GPUs by commas)."""
    from innkeeper.models.hardware import parse_size as hardware_size

    try:
        for part in text.split(","):
            hardware_size(part.strip())
    except ValueError as exc:
        raise ConfigError(f"--ram/--vram: {exc}") from None
    return text.strip()


def check_host_name(name: str) -> str:
    value = name.strip().lower().rstrip(".")
    if value != "*" and (not value or any(c in value for c in "/ @?#")):
        raise ConfigError(
            f"--allow-host takes a host name such as host.docker.internal (got {name!r})"
        )
    if value.count(":") == 1:  # host:port -> host (the Host check ignores ports)
        value = value.split(":")[0]
    return value.strip("[]")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `innkeeper serve` runs with: HTTP settings plus the engine's."""

    engine: EngineConfig
    host: str = setting(
        DEFAULT_HOST, "--host", help="address to listen on (not loopback: needs --api-key)"
    )
    port: int = setting(DEFAULT_PORT, "--port", min=1, max=65535, help="port for every API family")
    api_keys: tuple[str, ...] = setting(
        (), "--api-key", help="require this key (Bearer); repeatable"
    )
    insecure_no_auth: bool = setting(
        False, "--insecure-no-auth", help="allow a non-loopback --host without an API key"
    )
    cors_origins: tuple[str, ...] = setting(
        (),
        "--cors-origin",
        parse=check_origin,
        help="let browser pages from this origin call the API (e.g. http://localhost:8000, "
        "or *); repeatable",
    )
    allowed_hosts: tuple[str, ...] = setting(
        (),
        "--allow-host",
        parse=check_host_name,
        help="accept this Host name on a loopback server (e.g. host.docker.internal); repeatable",
    )
    max_body: int = setting(
        DEFAULT_MAX_BODY,
        "--max-body",
        parse=parse_size,
        min=1024,
        help="largest request body (e.g. 32M, 512K; default 32M)",
    )
    default_max_tokens: int | None = setting(
        None, "--max-tokens", min=1, help="default length when a request gives none"
    )
    request_timeout: float | None = setting(
        None,
        "--request-timeout",
        min=0.001,
        help="cancel a generation after this many seconds (default: never)",
    )
    sse_ping_interval: float = setting(
        DEFAULT_SSE_PING,
        "--sse-ping-interval",
        min=0,
        help="seconds between keep-alive comments on a silent stream (0 = off)",
    )
    model_alias: str | None = setting(None, "--alias", help="model name shown to clients")
    admin_keys: tuple[str, ...] = setting(
        (),
        "--admin-key",
        help="key for loading, unloading, pulling and deleting models (Bearer or X-Admin-Key; "
        "without one these work on a loopback server only); repeatable",
    )
    models_dirs: tuple[str, ...] = setting(
        (),
        "--models-dir",
        help="a folder of GGUF models clients may load by name; repeatable",
    )
    models_max: int = setting(
        1, "--models-max", min=1, max=64, help="models loaded at once (1: a load swaps)"
    )
    idle_unload: float = setting(
        0,
        "--idle-unload",
        min=0,
        help="unload a model unused for this many seconds (0 = never; requests may pass "
        "keep_alive)",
    )
    autoload: bool = setting(
        True,
        "--autoload/--no-autoload",
        help="load a model a request names (--no-autoload: 409 until an admin loads it)",
    )
    plan_ram: str | None = setting(
        None,
        "--ram",
        parse=check_plan_size,
        help="plan memory for this much RAM instead of what is free (e.g. 8GiB), as `fit` does",
    )
    plan_vram: str | None = setting(
        None,
        "--vram",
        parse=check_plan_size,
        help="plan memory for this much GPU memory (e.g. 12GiB; 24GiB,12GiB; 0 = no GPU)",
    )
    allow_pickle: bool = setting(
        False, "--allow-pickle", help="allow pickle weights (can run code!)"
    )

    @property
    def model_path(self) -> Path:
        return self.engine.model_path

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def validate(self) -> ServerConfig:
        """Raise ConfigError for the first setting that cannot work; returns self."""
        check_fields(self)
        self.engine.validate()
        if not self.loopback and not self.api_keys and not self.insecure_no_auth:
            raise ConfigError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach "
                "this machine could use the model. Add --api-key KEY (or --api-key-file FILE), "
                "or --insecure-no-auth if you really want an open server"
            )
        return self


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False

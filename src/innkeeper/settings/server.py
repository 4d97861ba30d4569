"""ServerConfig: the HTTP knobs of `innkeeper serve`, holding the engine's `EngineConfig`.

Each field is declared once with `setting(...)` (default, CLI flags, help, checks, panel); the
`serve` options are generated from these declarations and EngineConfig's (cli/options.py). To
add an HTTP setting, add one field here and read it where it takes effect.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from innkeeper.settings import (
    PANEL_MEMORY,
    PANEL_MODEL,
    PANEL_NETWORK,
    PANEL_PERFORMANCE,
    PANEL_RUNTIME,
    ConfigError,
    check_fields,
    parse_size,
    setting,
)
from innkeeper.settings.engine import EngineConfig

__all__ = ["ConfigError", "EngineConfig", "ServerConfig"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
DEFAULT_MAX_BODY = 32 * 2**20  # KoboldCpp's cap; a 128k-token prompt is ~0.5 MiB of text
DEFAULT_SSE_PING = 10.0


def check_origin(origin: str) -> str:
    """A CORS origin is `*` or scheme://host[:port], nothing more (no path, no trailing /)."""
    value = origin.strip().rstrip("/")
    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ConfigError(f"must be an origin like http://localhost:8000, or * (got {origin!r})")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def check_plan_size(text: str) -> str:
    """`--ram`/`--vram`: sizes (several GPUs by commas), kept as text for
    `hardware_with_overrides`."""
    for part in text.split(","):
        parse_size(part.strip())
    return text.strip()


def check_host_name(name: str) -> str:
    value = name.strip().lower().rstrip(".")
    if value != "*" and (not value or any(c in value for c in "/ @?#")):
        raise ConfigError(f"takes a host name such as host.docker.internal (got {name!r})")
    if value.count(":") == 1:  # host:port -> host (the Host check ignores ports)
        value = value.split(":")[0]
    return value.strip("[]")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `innkeeper serve` runs with: HTTP settings plus the engine's."""

    engine: EngineConfig
    host: str = setting(
        DEFAULT_HOST,
        "--host",
        metavar="ADDRESS",
        help="address to listen on (not loopback: needs --api-key)",
        panel=PANEL_NETWORK,
    )
    port: int = setting(
        DEFAULT_PORT,
        "--port",
        min=1,
        max=65535,
        help="port for every API family",
        panel=PANEL_NETWORK,
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "--api-key",
        metavar="KEY",
        help="require this key (Bearer); repeatable",
        panel=PANEL_NETWORK,
    )
    insecure_no_auth: bool = setting(
        False,
        "--insecure-no-auth",
        help="allow a non-loopback --host without an API key",
        panel=PANEL_NETWORK,
    )
    cors_origins: tuple[str, ...] = setting(
        (),
        "--cors-origin",
        parse=check_origin,
        metavar="ORIGIN",
        help="let browser pages from this origin call the API (e.g. http://localhost:8000, "
        "or *); repeatable",
        panel=PANEL_NETWORK,
    )
    allowed_hosts: tuple[str, ...] = setting(
        (),
        "--allow-host",
        parse=check_host_name,
        metavar="HOST",
        help="accept this Host name on a loopback server (e.g. host.docker.internal); repeatable",
        panel=PANEL_NETWORK,
    )
    max_body: int = setting(
        DEFAULT_MAX_BODY,
        "--max-body",
        parse=parse_size,
        min=1024,
        metavar="SIZE",
        help="largest request body, e.g. 512K or 1G (default: 32M)",
        panel=PANEL_NETWORK,
    )
    max_images: int = setting(
        8,
        "--max-images",
        min=0,
        help="most images one request may carry",
        panel=PANEL_NETWORK,
    )
    max_image_pixels: int = setting(
        16_777_216,
        "--max-image-pixels",
        min=1,
        metavar="N",
        help="largest image a request may carry, in pixels (width x height; default: 4096x4096)",
        panel=PANEL_NETWORK,
    )
    default_max_tokens: int | None = setting(
        None,
        "--max-tokens",
        min=1,
        help="default length when a request gives none",
        panel=PANEL_PERFORMANCE,
    )
    request_timeout: float | None = setting(
        None,
        "--request-timeout",
        min=0.001,
        metavar="SECONDS",
        help="cancel a generation after this many seconds (default: never)",
        panel=PANEL_PERFORMANCE,
    )
    sse_ping_interval: float = setting(
        DEFAULT_SSE_PING,
        "--sse-ping-interval",
        min=0,
        metavar="SECONDS",
        help="seconds between keep-alive comments on a silent stream (0: off)",
        panel=PANEL_NETWORK,
    )
    model_alias: str | None = setting(
        None,
        "--alias",
        metavar="NAME",
        help="model name shown to clients",
        panel=PANEL_MODEL,
    )
    admin_keys: tuple[str, ...] = setting(
        (),
        "--admin-key",
        metavar="KEY",
        help="key for loading, unloading, pulling and deleting models (Bearer or X-Admin-Key; "
        "without one these work on a loopback server only); repeatable",
        panel=PANEL_NETWORK,
    )
    models_dirs: tuple[str, ...] = setting(
        (),
        "--models-dir",
        metavar="DIR",
        help="a folder of GGUF models clients may load by name; repeatable",
        panel=PANEL_RUNTIME,
    )
    models_max: int = setting(
        1,
        "--models-max",
        min=1,
        max=64,
        help="models loaded at once (1: a load swaps)",
        panel=PANEL_RUNTIME,
    )
    idle_unload: float = setting(
        0,
        "--idle-unload",
        min=0,
        metavar="SECONDS",
        help="unload a model unused for this many seconds (0: never; requests may pass keep_alive)",
        panel=PANEL_RUNTIME,
    )
    autoload: bool = setting(
        True,
        "--autoload/--no-autoload",
        help="load a model a request names (--no-autoload: 409 until an admin loads it)",
        panel=PANEL_RUNTIME,
    )
    plan_ram: str | None = setting(
        None,
        "--ram",
        parse=check_plan_size,
        metavar="SIZE",
        help="plan for this much RAM instead of what is free (e.g. 8GiB)",
        panel=PANEL_MEMORY,
        memory=True,
    )
    plan_vram: str | None = setting(
        None,
        "--vram",
        parse=check_plan_size,
        metavar="SIZE",
        help="plan for this much GPU memory (e.g. 12GiB; 24GiB,12GiB; 0: no GPU)",
        panel=PANEL_MEMORY,
        memory=True,
    )
    slot_save_path: str | None = setting(
        None,
        "--slot-save-path",
        metavar="DIR",
        help="folder for /slots/{id}?action=save|restore files (unset: refused)",
        panel=PANEL_RUNTIME,
    )
    allow_pickle: bool = setting(
        False,
        "--allow-pickle",
        help="allow pickle weights (can run code!)",
        panel=PANEL_MODEL,
    )
    use_profile: bool = setting(
        True,
        "--profile/--no-profile",
        help="use the settings `innkeeper tune` saved for this model and machine; flags given "
        "here win (--no-profile: ignore them)",
        panel=PANEL_PERFORMANCE,
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

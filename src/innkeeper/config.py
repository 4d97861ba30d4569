"""ServerConfig: every knob of `innkeeper serve`, its default and its validation."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from innkeeper.engine.backend import CACHE_TYPES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
DEFAULT_MAX_BODY = 32 * 2**20  # KoboldCpp's cap; a 128k-token prompt is ~0.5 MiB of text
DEFAULT_SSE_PING = 10.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting that cannot work; the CLI prints it as one error line."""


@dataclass
class ServerConfig:
    model_path: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: list[str] = field(default_factory=list)
    ctx_size: int | None = None  # None: chosen from the model and the memory plan
    gpu_layers: int | None = None  # None: auto
    threads: int = 0
    threads_batch: int = 0
    batch_size: int = 2048
    ubatch_size: int = 512
    parallel: int = 4
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    mlock: bool = False
    mmap: bool = True
    chat_template: str | None = None
    cache_reuse: int = 32
    cache_ram_mib: int = 2048
    max_queue: int = 64
    default_max_tokens: int | None = None
    allow_pickle: bool = False
    model_alias: str | None = None
    insecure_no_auth: bool = False
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    max_body: int = DEFAULT_MAX_BODY
    request_timeout: float | None = None  # seconds; None: no limit
    sse_ping_interval: float = DEFAULT_SSE_PING  # 0: no keep-alive comments

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535 (got {self.port})")
        if self.ctx_size is not None and self.ctx_size < 64:
            raise ConfigError(f"--ctx-size must be at least 64 (got {self.ctx_size})")
        if self.parallel < 1 or self.parallel > 64:
            raise ConfigError(f"--parallel must be between 1 and 64 (got {self.parallel})")
        if self.flash_attn not in ("auto", "on", "off"):
            raise ConfigError(f"--flash-attn must be on, off or auto (got {self.flash_attn!r})")
        for name in (self.cache_type_k, self.cache_type_v):
            if name not in CACHE_TYPES:
                raise ConfigError(
                    f"unknown cache type {name!r}: use one of {', '.join(CACHE_TYPES)}"
                )
        if self.cache_type_v != "f16" and self.flash_attn == "off":
            raise ConfigError("a quantized V cache needs flash attention: add --flash-attn on")
        if self.ubatch_size < 1 or self.batch_size < 1:
            raise ConfigError("--batch-size and --ubatch-size must be positive")
        if self.cache_reuse < 0 or self.cache_ram_mib < 0:
            raise ConfigError("--cache-reuse and --cache-ram must not be negative")
        if self.threads < 0 or self.threads_batch < 0:
            raise ConfigError("--threads must be positive (0 = automatic)")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ConfigError("--max-tokens must be at least 1")
        if not self.loopback and not self.api_keys and not self.insecure_no_auth:
            raise ConfigError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach "
                "this machine could use the model. Add --api-key KEY (or --api-key-file FILE), "
                "or --insecure-no-auth if you really want an open server"
            )
        if self.max_body < 1024:
            raise ConfigError(f"--max-body must be at least 1 KiB (got {self.max_body} bytes)")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ConfigError("--request-timeout must be positive (omit it for no limit)")
        if self.sse_ping_interval < 0:
            raise ConfigError("--sse-ping-interval must be 0 (off) or positive")
        self.cors_origins = [check_origin(o) for o in self.cors_origins]
        self.allowed_hosts = [check_host_name(h) for h in self.allowed_hosts]


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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


def check_host_name(name: str) -> str:
    value = name.strip().lower().rstrip(".")
    if value != "*" and (not value or any(c in value for c in "/ @?#")):
        raise ConfigError(
            f"--allow-host takes a host name such as host.docker.internal (got {name!r})"
        )
    if value.count(":") == 1:  # host:port -> host (the Host check ignores ports)
        value = value.split(":")[0]
    return value.strip("[]")

"""ServerConfig: every knob of `innkeeper serve`, its default and its validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from innkeeper.engine.backend import CACHE_TYPES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001


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
    max_queue: int = 64
    default_max_tokens: int | None = None
    allow_pickle: bool = False
    model_alias: str | None = None

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
        if self.threads < 0 or self.threads_batch < 0:
            raise ConfigError("--threads must be positive (0 = automatic)")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ConfigError("--max-tokens must be at least 1")

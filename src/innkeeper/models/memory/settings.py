"""What the plan reads: the engine's own settings, at the context size being planned.

Every setting that changes memory is declared once, in `EngineConfig` (settings/engine.py);
the plan reads it from there, so `serve`, `fit`, `pull` and HTTP loads plan with the same
defaults. Only two facts are the plan's own: the context size being tried (a candidate, when
the engine's is automatic) and whether the slots share one KV cache (innkeeper's engine always
does; llama.cpp's library default, which its dry runs measure, does not).
"""

from __future__ import annotations

from dataclasses import dataclass

from innkeeper.settings import ConfigError
from innkeeper.settings.engine import DEFAULT_CTX, FLASH_ATTN_MODES, EngineConfig


@dataclass(frozen=True)
class MemorySettings:
    """The engine's settings as the plan reads them (see the module's docstring)."""

    engine: EngineConfig
    ctx_size: int  # the context size planned for
    kv_unified: bool = True  # one KV cache shared by every slot, as innkeeper's engine runs


def memory_settings(cfg: EngineConfig, *, kv_unified: bool = True) -> MemorySettings:
    """The plan's view of `cfg` at its own context size (DEFAULT_CTX when automatic)."""
    return MemorySettings(cfg, cfg.ctx_size or DEFAULT_CTX, kv_unified)


def flash_attn_enabled(mode: str, architecture: str = "") -> bool:
    """Whether llama.cpp will run with flash attention for `--flash-attn MODE`, for planning.

    llama.cpp (0c1e570, `llama_init_from_model` and `llama_context::resolve_fused_ops`) forces
    it off for Grok, and resolves `auto` by building a graph with flash attention on and
    keeping it unless some layer's attention op lands on another device than the layer
    ("usually due to missing support"). Its CPU backend supports it for every model, and the
    GPU backends for the head sizes of common models, so `auto` plans as on: `fit` and
    `serve` then plan the same memory for the same flags.
    """
    m = mode.strip().lower()
    if m not in FLASH_ATTN_MODES:
        raise ConfigError(f"--flash-attn takes on, off or auto, not {mode!r}")
    if architecture.lower() == "grok":
        return False
    return m != "off"

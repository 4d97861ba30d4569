"""The engine facade: one model, one context, one scheduler, and the settings they run with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from innkeeper.engine.backend import (
    CACHE_TYPES,
    Context,
    ContextParams,
    Model,
    ModelInfo,
    default_threads,
)
from innkeeper.engine.events import GenerationRequest
from innkeeper.engine.scheduler import Scheduler
from innkeeper.engine.templates import ChatTemplate, resolve_template

DEFAULT_CTX = 4096


@dataclass(frozen=True)
class EngineConfig:
    """Every knob the engine takes; `ServerConfig` fills it from CLI flags."""

    model_path: Path
    ctx_size: int = 0  # 0: the model's trained context, at most DEFAULT_CTX
    gpu_layers: int = 0
    threads: int = 0
    threads_batch: int = 0
    batch_size: int = 2048
    ubatch_size: int = 512
    parallel: int = 4
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    use_mmap: bool = True
    use_mlock: bool = False
    cache_reuse: int = 32
    max_queue: int = 64
    cache_ram_mib: int = 2048  # idle conversations' KV parked in RAM (0 = none)
    chat_template: str | None = None  # a built-in name, a file path, or None: the GGUF's own


class Engine:
    """Loads the model and runs generations; knows nothing about HTTP."""

    def __init__(self, config: EngineConfig) -> None:
        for name in (config.cache_type_k, config.cache_type_v):
            if name not in CACHE_TYPES:
                raise ValueError(
                    f"unknown cache type {name!r}: use one of {', '.join(CACHE_TYPES)}"
                )
        if config.cache_type_v != "f16" and config.flash_attn == "off":
            raise ValueError("a quantized V cache needs flash attention (--flash-attn on)")
        self.config = config
        self.model = Model(
            config.model_path,
            gpu_layers=config.gpu_layers,
            use_mmap=config.use_mmap,
            use_mlock=config.use_mlock,
        )
        try:
            self.ctx = Context(
                self.model,
                ContextParams(
                    n_ctx=config.ctx_size
                    or min(self.model.info.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX),
                    n_seq=max(1, config.parallel),
                    n_batch=config.batch_size,
                    n_ubatch=config.ubatch_size,
                    threads=config.threads or default_threads(),
                    threads_batch=config.threads_batch,
                    flash_attn=config.flash_attn,
                    cache_type_k=config.cache_type_k,
                    cache_type_v=config.cache_type_v,
                ),
            )
        except Exception:
            self.model.close()
            raise
        self.template: ChatTemplate = resolve_template(config.chat_template, self.model.info)
        self.scheduler = Scheduler(
            self.model,
            self.ctx,
            max(1, config.parallel),
            cache_reuse=config.cache_reuse,
            max_queue=config.max_queue,
            cache_ram=config.cache_ram_mib * 2**20,
        )
        self.scheduler.start()

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def submit(self, request: GenerationRequest) -> None:
        self.scheduler.submit(request)

    def close(self) -> None:
        self.scheduler.stop()
        self.ctx.close()
        self.model.close()

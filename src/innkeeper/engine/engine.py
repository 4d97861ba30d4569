"""The engine facade: one model, one context, one scheduler, and the settings they run with."""

from __future__ import annotations

import threading

from innkeeper.engine.backend import (
    Context,
    ContextParams,
    Model,
    ModelInfo,
    ModelParams,
    default_threads,
)
from innkeeper.engine.events import GenerationRequest
from innkeeper.engine.scheduler import Scheduler
from innkeeper.engine.templates import ChatTemplate, resolve_template
from innkeeper.engine.tokenizer import Tokenizer
from innkeeper.settings.engine import DEFAULT_CTX, EngineConfig

__all__ = ["DEFAULT_CTX", "Engine", "EngineConfig"]


def model_params(config: EngineConfig) -> ModelParams:
    """The one place engine settings become llama.cpp model parameters."""
    return ModelParams(
        gpu_layers=config.gpu_layers if config.gpu_layers is not None else 0,
        use_mmap=config.use_mmap,
        use_mlock=config.use_mlock,
        main_gpu=config.main_gpu,
        split_mode=config.split_mode,
        tensor_split=config.tensor_split,
        cpu_tensor_patterns=config.cpu_tensor_patterns,
    )


def context_params(config: EngineConfig, n_ctx_train: int) -> ContextParams:
    """The one place engine settings become llama.cpp context parameters."""
    return ContextParams(
        n_ctx=config.ctx_size or min(n_ctx_train or DEFAULT_CTX, DEFAULT_CTX),
        n_seq=config.parallel,
        n_batch=config.batch_size,
        n_ubatch=config.ubatch_size,
        threads=config.threads or default_threads(),
        threads_batch=config.threads_batch,
        flash_attn=config.flash_attn,
        cache_type_k=config.cache_type_k,
        cache_type_v=config.cache_type_v,
        offload_kqv=config.kv_offload,
        swa_full=config.swa_full,
    )


class Engine:
    """Loads the model and runs generations; knows nothing about HTTP."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()  # ConfigError (a ValueError) names the flag at fault
        self.config = config
        self.model = Model(config.model_path, model_params(config))
        try:
            self.ctx = Context(self.model, context_params(config, self.model.info.n_ctx_train))
        except Exception:
            self.model.close()
            raise
        self.template: ChatTemplate = resolve_template(config.chat_template, self.model.info)
        self.tokenizer = Tokenizer(self.model)
        self.scheduler = Scheduler(
            self.model,
            self.ctx,
            config.parallel,
            cache_reuse=config.cache_reuse,
            max_queue=config.max_queue,
            cache_ram=config.cache_ram_mib * 2**20,
            ctx_checkpoints=config.ctx_checkpoints,
        )
        self.scheduler.start()

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def tokenize(
        self,
        text: str,
        *,
        add_special: bool = True,
        cancel: threading.Event | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """Text to ids in linear time; any thread (see `Tokenizer` for `cancel`/`limit`)."""
        return self.tokenizer.tokenize(text, add_special=add_special, cancel=cancel, limit=limit)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def submit(self, request: GenerationRequest) -> None:
        self.scheduler.submit(request)

    def close(self) -> None:
        self.scheduler.stop()
        self.ctx.close()
        self.model.close()

"""The engine facade: one model, one context, one scheduler, and the settings they run with."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from innkeeper.engine import slots as slot_ops
from innkeeper.engine.backend import (
    Context,
    ContextParams,
    Model,
    ModelInfo,
    ModelParams,
    default_threads,
)
from innkeeper.engine.events import GenerationRequest
from innkeeper.engine.sampling import SamplingParams
from innkeeper.engine.scheduler import Perf, QueueFullError, Scheduler
from innkeeper.engine.templates import ChatTemplate, resolve_template
from innkeeper.engine.tokenizer import Tokenizer
from innkeeper.settings.engine import DEFAULT_CTX, EngineConfig

__all__ = [
    "DEFAULT_CTX",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Perf",
    "QueueFullError",
    "SlotView",
]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of a running engine for routes and the CLI, so they need no internals."""

    slots: int  # generation slots in all
    busy_slots: int  # slots running a request now
    queued: int  # requests waiting for a slot
    slot_cells: tuple[int, ...]  # tokens held in each slot's KV cache
    threads: int
    threads_batch: int
    perf: Perf  # a copy of the scheduler's counters


@dataclass(frozen=True)
class SlotView:
    """One slot as /slots reports it: what it holds and the request it runs, if any."""

    id: int
    state: str  # "idle", "prompt" (evaluating the prompt) or "generating"
    n_cached: int  # tokens in its KV cache now
    request_id: int | None
    params: SamplingParams | None
    max_tokens: int
    n_prompt: int
    n_decoded: int  # tokens generated so far


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
        """Queue a request (any thread); raises QueueFullError at --max-queue."""
        self.scheduler.submit(request)

    def cancel_all(self) -> int:
        """Abort every running and queued request (any thread); returns how many."""
        return self.scheduler.cancel_all()

    def stats(self) -> EngineStats:
        """Counters and slot occupancy now (any thread; each field is read without a lock,
        so they may be a step apart, as the perf endpoints always were)."""
        sched = self.scheduler
        return EngineStats(
            slots=len(sched.slots),
            busy_slots=sched.busy_slots,
            queued=sched.queued,
            slot_cells=tuple(len(s.cache) for s in sched.slots),
            threads=self.ctx.threads,
            threads_batch=self.ctx.threads_batch,
            perf=copy.copy(sched.perf),
        )

    def slots(self) -> tuple[SlotView, ...]:
        """Each slot's state now (any thread; read without a lock, like `stats`)."""
        out = []
        for slot in self.scheduler.slots:
            gen = slot.gen
            req = gen.req if gen is not None else None
            out.append(
                SlotView(
                    id=slot.id,
                    state=slot.state.value,
                    n_cached=len(slot.cache),
                    request_id=req.id if req else None,
                    params=req.params if req else None,
                    max_tokens=req.max_tokens if req else 0,
                    n_prompt=len(req.prompt) if req else 0,
                    n_decoded=len(gen.stream.tokens) if gen is not None else 0,
                )
            )
        return tuple(out)

    def save_slot(self, slot_id: int, path: Path) -> Future[tuple[int, int]]:
        """Write an idle slot's tokens and KV state to a file (on the engine thread);
        the future gives (tokens, bytes) or raises SlotBusy / SlotFileError."""
        slot = self.scheduler.slots[slot_id]
        return self.scheduler.call(lambda: slot_ops.save_file(slot, self.ctx, path))

    def restore_slot(self, slot_id: int, path: Path) -> Future[tuple[int, int]]:
        """Load a slot file into an idle slot (engine thread): (tokens, bytes)."""
        slot = self.scheduler.slots[slot_id]
        n_vocab = self.model.n_vocab
        return self.scheduler.call(lambda: slot_ops.load_file(slot, self.ctx, path, n_vocab))

    def erase_slot(self, slot_id: int) -> Future[int]:
        """Drop an idle slot's cache (engine thread): the tokens it held."""
        slot = self.scheduler.slots[slot_id]
        return self.scheduler.call(lambda: slot_ops.erase(slot, self.ctx))

    def close(self) -> None:
        self.scheduler.stop()
        self.ctx.close()
        self.model.close()

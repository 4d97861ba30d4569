"""The engine facade: one model, one context, one scheduler, and the settings they run with."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from innkeeper.engine import slots as slot_ops
from innkeeper.engine.backend import Context, Model, ModelInfo, default_threads
from innkeeper.engine.embeddings import EMBED_SEQS, Embedder, Embeddings, model_kind
from innkeeper.engine.events import EngineLost, ErrorKind, GenerationRequest
from innkeeper.engine.llama_params import BackendError, ContextParams, ModelParams
from innkeeper.engine.sampling import SamplingParams
from innkeeper.engine.scheduler import Perf, QueueFullError, Scheduler
from innkeeper.engine.templates import ChatTemplate, resolve_template
from innkeeper.engine.tokenizer import Tokenizer
from innkeeper.engine.vision import ImageInput, MediaPrompt, Vision, VisionError
from innkeeper.settings.engine import DEFAULT_CTX, EngineConfig

log = logging.getLogger("innkeeper.engine")

T = TypeVar("T")

__all__ = [
    "DEFAULT_CTX",
    "Engine",
    "EngineConfig",
    "EngineLost",
    "EngineStats",
    "NotAChatModel",
    "Perf",
    "QueueFullError",
    "SlotView",
]


class NotAChatModel(RuntimeError):
    """A generation was submitted to an embedding model (it has no generation context)."""


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
        rpc=config.rpc,
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


def embedding_sizes(config: EngineConfig, n_ctx_train: int, chat_ctx: int | None) -> list[int]:
    """Sizes to try for the embeddings context, largest first. It decodes each input whole
    (pooling needs a sequence in one ubatch), so its size is also its ubatch and the longest
    input: up to one logical batch (--batch-size), else one physical batch (--ubatch-size)
    when the larger one cannot be created (a GPU the plan filled); never more than the
    model's context (an embedding model's) or the generation context (a chat model's).

    The memory plan (models/memory) does not model this context; it approximates it. For an
    embedding model it plans the usual context: a KV cache of n_ctx cells that an encoder
    does not have (an overestimate) and a compute buffer for min(--ubatch-size, n_ctx) tokens
    where the embeddings context runs up to --batch-size at once (equal for a BERT of 512
    tokens; an underestimate for a long-context embedding model). Beside a chat model the
    context is created on the first embedding request and the plan does not count it: one
    more compute buffer of up to --batch-size tokens, and as many KV cells.
    """
    ctx = chat_ctx or context_params(config, n_ctx_train).n_ctx
    if n_ctx_train:
        ctx = min(ctx, n_ctx_train)
    sizes = (min(ctx, config.batch_size), min(ctx, config.ubatch_size))
    return sorted(set(sizes), reverse=True)


class Engine:
    """Loads the model and runs generations (a chat model) or embeddings; knows nothing
    about HTTP. An embedding model gets no generation context and no scheduler."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()  # ConfigError (a ValueError) names the flag at fault
        self.config = config
        self.model = Model(config.model_path, model_params(config))
        self.kind = model_kind(self.model.meta)
        self.ctx: Context | None = None
        self.scheduler: Scheduler | None = None
        self.vision: Vision | None = None
        self.vision_error: str | None = None  # why the model's projector did not load
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self.lost: str | None = None  # why the model can run no more (`wreck`)
        self._waiters: set[Future[Any]] = set()  # `guard`'s futures, failed by `wreck`
        self._waiters_lock = threading.Lock()
        try:
            if self.kind != "chat":  # an embedding model or a reranker: no generation
                self._embedder = self._new_embedder()
            else:
                self.ctx = Context(self.model, context_params(config, self.model.info.n_ctx_train))
                if config.mmproj is not None:
                    self.vision = self._load_vision(config.mmproj)
        except Exception:
            if self.ctx is not None:
                self.ctx.close()
            self.model.close()
            raise
        self.template: ChatTemplate = resolve_template(config.chat_template, self.model.info)
        self.tokenizer = Tokenizer(self.model)
        if self.ctx is not None:
            self.scheduler = Scheduler(
                self.model,
                self.ctx,
                config.parallel,
                cache_reuse=config.cache_reuse,
                max_queue=config.max_queue,
                cache_ram=config.cache_ram_mib * 2**20,
                ctx_checkpoints=config.ctx_checkpoints,
                vision=self.vision,
            )
            self.scheduler.start()

    def _load_vision(self, path: Path) -> Vision | None:
        """The projector, or None (logged, and said to clients who send images): a
        projector that does not fit the model must not keep its text from being served."""
        assert self.ctx is not None
        try:
            return Vision(
                self.model,
                path,
                threads=self.ctx.threads_batch,
                use_gpu=self.config.gpu_layers != 0,
            )
        except BackendError as exc:
            self.vision_error = f"its projector {path.name} did not load: {exc}"
            log.error("%s: %s; serving text only", self.model.info.path.name, self.vision_error)
            return None

    def _new_embedder(self) -> Embedder:
        chat_ctx = self.ctx.n_ctx if self.ctx is not None else None
        sizes = embedding_sizes(self.config, self.model.info.n_ctx_train, chat_ctx)
        base = context_params(self.config, self.model.info.n_ctx_train)
        pooling = self.config.pooling
        for n in sizes[:-1]:
            try:
                return Embedder(self.model, replace(base, n_ctx=n, n_seq=EMBED_SEQS), pooling)
            except BackendError as exc:
                log.warning("no embeddings context of %d tokens (%s): trying smaller", n, exc)
        return Embedder(self.model, replace(base, n_ctx=sizes[-1], n_seq=EMBED_SEQS), pooling)

    @property
    def embedder(self) -> Embedder:
        """The embeddings context; a chat model's is created on first use (any thread), so a
        server that never embeds never pays for its buffers."""
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = self._new_embedder()
            return self._embedder

    def embed(
        self,
        inputs: list[list[int]],
        *,
        normalize: bool = True,
        truncate: bool = False,
        cancel: threading.Event | None = None,
    ) -> Embeddings:
        """Embed token lists on the calling thread (serving's workers, never the event loop)."""
        return self.embedder.embed(inputs, normalize=normalize, truncate=truncate, cancel=cancel)

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx if self.ctx is not None else self.embedder.n_ctx

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

    def tokenize_media(self, text: str, images: list[ImageInput]) -> MediaPrompt:
        """Text with `vision.MARKER` where each image goes, into tokens and image chunks
        (any thread); VisionError when this model has no projector."""
        if self.vision is None:
            why = self.vision_error or (
                "serve it with --mmproj FILE, or put its mmproj-*.gguf beside it"
            )
            raise VisionError(
                f"{self.model.info.path.name} has no vision projector: it cannot take images "
                f"({why})"
            )
        return self.vision.tokenize(text, images)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request (any thread); raises QueueFullError at --max-queue."""
        if self.scheduler is None:
            raise NotAChatModel(f"{self.model.info.path.name} is an {self.kind} model")
        if self.lost is not None:
            raise EngineLost(self.lost)
        if request.media is not None and self.vision is None:
            raise VisionError(f"{self.model.info.path.name} has no vision projector")
        self.scheduler.submit(request)

    def cancel_all(self) -> int:
        """Abort every running and queued request (any thread); returns how many."""
        return self.scheduler.cancel_all() if self.scheduler is not None else 0

    def wreck(self, why: str) -> int:
        """An RPC worker of this model is gone (any thread): its engine thread is stuck in
        llama.cpp for good, so every running and queued request ends now with `why`, and
        the model is never freed (`close` does nothing: freeing its buffers would wait on
        the dead connection). Every `guard`ed wait (slot files, embeddings, serving's work on
        the model) ends with EngineLost. Returns how many requests ended."""
        with self._waiters_lock:
            self.lost = why
            waiters = list(self._waiters)
            self._waiters.clear()
        for outer in waiters:
            _settle(outer, EngineLost(why))
        if self.scheduler is None:
            return 0
        return self.scheduler.fail_all(why, ErrorKind.WORKER_LOST)

    def guard(self, inner: Future[T]) -> Future[T]:
        """A future with `inner`'s outcome, or EngineLost as soon as the engine is wrecked (at
        once if it already is): work stuck with the engine's thread in llama.cpp (an embedding
        decode, a slot file) never settles `inner`, and its caller must not wait for it.
        Cancelling the result cancels `inner` if it has not started."""
        outer: Future[T] = Future()
        with self._waiters_lock:
            lost = self.lost
            if lost is None:
                self._waiters.add(outer)
        if lost is not None:
            inner.cancel()
            outer.set_exception(EngineLost(lost))
            return outer

        def settle(done: Future[T]) -> None:
            with self._waiters_lock:
                if outer not in self._waiters:  # wrecked first
                    return
                self._waiters.discard(outer)
            if done.cancelled():
                outer.cancel()
            elif (exc := done.exception()) is not None:
                _settle(outer, exc)
            else:
                _settle(outer, None, done.result())

        def forget(done: Future[T]) -> None:
            if done.cancelled():
                with self._waiters_lock:
                    self._waiters.discard(outer)
                inner.cancel()

        outer.add_done_callback(forget)
        inner.add_done_callback(settle)
        return outer

    def stats(self) -> EngineStats:
        """Counters and slot occupancy now (any thread; each field is read without a lock,
        so they may be a step apart, as the perf endpoints always were)."""
        sched = self.scheduler
        if sched is None:
            ctx = self.embedder.ctx
            return EngineStats(0, 0, 0, (), ctx.threads, ctx.threads_batch, Perf())
        assert self.ctx is not None
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
        """Each slot's state now (any thread; read without a lock, like `stats`); an
        embedding model has none."""
        if self.scheduler is None:
            return ()
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

    def _slot(self, slot_id: int) -> slot_ops.Slot:
        if self.scheduler is None:
            raise NotAChatModel(f"{self.model.info.path.name} is an {self.kind} model")
        return self.scheduler.slots[slot_id]

    def save_slot(self, slot_id: int, path: Path) -> Future[tuple[int, int]]:
        """Write an idle slot's tokens and KV state to a file (on the engine thread);
        the future gives (tokens, bytes) or raises SlotBusy / SlotFileError (EngineLost
        once the engine is wrecked, even while the engine thread runs it)."""
        slot = self._slot(slot_id)
        return self.guard(self.scheduler.call(lambda: slot_ops.save_file(slot, self.ctx, path)))

    def restore_slot(self, slot_id: int, path: Path) -> Future[tuple[int, int]]:
        """Load a slot file into an idle slot (engine thread): (tokens, bytes)."""
        slot = self._slot(slot_id)
        n_vocab = self.model.n_vocab
        return self.guard(
            self.scheduler.call(lambda: slot_ops.load_file(slot, self.ctx, path, n_vocab))
        )

    def erase_slot(self, slot_id: int) -> Future[int]:
        """Drop an idle slot's cache (engine thread): the tokens it held."""
        slot = self._slot(slot_id)
        return self.guard(self.scheduler.call(lambda: slot_ops.erase(slot, self.ctx)))

    def close(self) -> None:
        if self.lost is not None:
            log.warning("%s stays in memory: %s", self.model.info.path.name, self.lost)
            return
        if self.scheduler is not None:
            self.scheduler.stop()
            if self.lost is not None:  # wrecked while it stopped: its thread never will
                log.warning("%s stays in memory: %s", self.model.info.path.name, self.lost)
                return
        if self._embedder is not None:
            self._embedder.close()
        if self.vision is not None:
            self.vision.close()
        if self.ctx is not None:
            self.ctx.close()
        self.model.close()


def _settle(future: Future[Any], exc: BaseException | None, result: Any = None) -> None:
    """Give `future` its outcome unless its waiter already cancelled it."""
    with contextlib.suppress(InvalidStateError):  # cancelled meanwhile: nobody waits for it
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

"""One loaded model as requests use it: the bridge between asyncio and the engine thread.

Route modules call `Service.start()` with token ids and a normalised `Generation`; they get a
`RunningGeneration` whose events they await. Tokenising, templates and grammar checks run on
worker threads, never on the event loop. Nothing here knows HTTP: a client that may hang up is
anything with an ASGI `receive()` (`Disconnectable`), and refusals are typed `ServingError`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from innkeeper.engine.backend import ModelInfo
from innkeeper.engine.embeddings import Embeddings
from innkeeper.engine.engine import Engine, EngineStats
from innkeeper.engine.events import EngineLost, FinishEvent, GenerationRequest
from innkeeper.engine.sampling import GrammarError, check_grammar
from innkeeper.engine.scheduler import QueueFullError
from innkeeper.engine.templates import ChatTemplate
from innkeeper.engine.tokenizer import TokenizeCancelled, TooManyTokens
from innkeeper.engine.vision import ImageInput, MediaPrompt, VisionError
from innkeeper.serving import embeddings
from innkeeper.serving.errors import ClientGone, ModelBusy, ParamError, WorkerLost
from innkeeper.serving.generation import EventInbox, Generation, RunningGeneration
from innkeeper.serving.prompt_fit import check_lengths, fit_prompt
from innkeeper.serving.runs import RunBook

log = logging.getLogger("innkeeper.serving")

# Threads that tokenise, render templates and compile grammars for requests, so that the
# event loop never does work proportional to a request body (a 30 MB /tokenize, a 40k-message
# chat). Few: the engine thread needs the cores more; more requests than this wait their turn.
OFF_LOOP_THREADS = 2
# Token-count routes (/tokenize, /api/extra/tokencount…) and prompts that are left-trimmed
# to fit (truncation_length, max_context_length) may hold this many contexts' worth of tokens.
COUNT_LIMIT_CONTEXTS = 4
GRAMMARS_REMEMBERED = 64  # grammars already checked: a chat resending one is not re-parsed

T = TypeVar("T")


class Disconnectable(Protocol):
    """A client connection that reports its end: an ASGI request's `receive`."""

    async def receive(self) -> Mapping[str, Any]: ...


class Service:
    """Validates lengths, submits to the engine and tracks what is running."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_id: str,
        default_max_tokens: int | None = None,
        request_timeout: float | None = None,
        sse_ping_interval: float = 10.0,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        self.request_timeout = request_timeout
        self.sse_ping_interval = sse_ping_interval
        self.runs = RunBook()  # in flight, and the genkey routes' view of them (runs.py)
        self.started = time.time()
        self._pool = pool or ThreadPoolExecutor(
            OFF_LOOP_THREADS, thread_name_prefix="innkeeper-work"
        )
        self._grammars_ok: OrderedDict[str, None] = OrderedDict()
        self.users = 0  # requests holding this model now (the registry unloads at 0)
        self.last_used = time.monotonic()  # for LRU eviction and idle unload
        self.closed = False  # set by the registry when it unloads the model
        self._embed_pool: ThreadPoolExecutor | None = None

    # ---- what routes may read about the model (they never touch the engine itself) --------
    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.engine.model.n_vocab

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def kind(self) -> str:
        """The model's kind: chat, embedding or rerank (only a chat model generates)."""
        return self.engine.kind

    @property
    def template(self) -> ChatTemplate:
        return self.engine.template

    @property
    def bos(self) -> int:
        return self.engine.model.bos

    def piece(self, token: int) -> str:
        return self.engine.model.piece(token).decode("utf-8", "replace")

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the model was loaded with (the registry's and the page's names)."""
        cfg = self.engine.config
        stats = self.engine.stats()
        return {
            "ctx_size": self.n_ctx,
            "gpu_layers": cfg.gpu_layers,
            "cache_type_k": cfg.cache_type_k,
            "cache_type_v": cfg.cache_type_v,
            "flash_attn": cfg.flash_attn,
            "parallel": cfg.parallel,
            "rpc": list(cfg.rpc),
            "threads": stats.threads,
            "threads_batch": stats.threads_batch,
        }

    def stats(self) -> EngineStats:
        """The engine's slots, queue and counters, read in one go (routes, banner, metrics)."""
        return self.engine.stats()

    @property
    def busy(self) -> bool:
        """Anything running, queued or about to start: an unload must wait."""
        if self.users or self.runs:
            return True
        stats = self.engine.stats()
        return bool(stats.busy_slots or stats.queued)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def cancel_all(self) -> int:
        """Cancel every running and queued generation (shutdown); returns how many."""
        return self.engine.cancel_all()

    def close(self) -> None:
        """Free the model (any thread); requests still holding it get a 503 on start."""
        self.closed = True
        pool, self._embed_pool = self._embed_pool, None
        if pool is not None:
            # No decode may outlive the model; but one stuck on a lost worker never ends.
            drained = pool.submit(lambda: None)  # runs after every earlier one
            pool.shutdown(wait=False)
            with contextlib.suppress(EngineLost):  # wrecked: engine.close frees nothing
                self.engine.guard(drained).result()
        self.engine.close()

    def check_open(self) -> None:
        """Refuse new work on a model wrecked by a lost worker (502) or being unloaded (503)."""
        if self.engine.lost is not None:
            raise WorkerLost(self.engine.lost)
        if self.closed:
            raise ModelBusy(
                f"model {self.model_id!r} was just unloaded; send the request again",
                retry_after=1,
            )

    async def off_loop(
        self,
        work: Callable[[threading.Event], T],
        request: Disconnectable | None = None,
        *,
        pool: ThreadPoolExecutor | None = None,
    ) -> T:
        """Run `work(cancel)` on the service's worker threads (or `pool`) instead of the event
        loop.

        When the client of `request` hangs up (or the awaiting task is cancelled), `cancel`
        is set; work that comes in pieces (tokenising) stops at the next piece. When a lost
        RPC worker wrecks the model, the wait ends at once with WorkerLost (a decode on it
        never returns).
        """
        cancel = threading.Event()
        inner = (pool or self._pool).submit(work, cancel)
        future = asyncio.wrap_future(self.engine.guard(inner))
        watcher = asyncio.create_task(_wait_disconnect(request)) if request is not None else None
        try:
            if watcher is not None:
                await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not future.done():
                    cancel.set()
                    future.add_done_callback(_retrieve)  # its outcome no longer matters
                    raise ClientGone("the client went away")
            return await future
        except EngineLost as exc:
            cancel.set()
            raise WorkerLost(exc.message) from exc
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher

    @property
    def count_limit(self) -> int:
        """The most tokens a count route or a left-trimmed prompt may have."""
        return COUNT_LIMIT_CONTEXTS * max(self.n_ctx, self.engine.info.n_ctx_train)

    def prompt_limit(self, gen: Generation | None) -> int:
        """The most tokens a prompt for `gen` can usefully have: more can only be refused
        (a prompt must leave room in the context), unless it is left-trimmed to fit."""
        if gen is not None and gen.truncate_to:
            return self.count_limit
        return self.n_ctx - 1

    def tokenize_now(
        self,
        text: str,
        add_special: bool = True,
        *,
        limit: int | None = None,
        cancel: threading.Event | None = None,
    ) -> list[int]:
        """Tokenise on this thread (a worker: see `tokenize`); over `limit` is a ParamError."""
        limit = self.count_limit if limit is None else limit
        try:
            return self.engine.tokenize(text, add_special=add_special, cancel=cancel, limit=limit)
        except TooManyTokens as exc:
            if limit < self.n_ctx:
                raise ParamError(
                    f"the prompt has at least {exc.at_least} tokens but the context holds "
                    f"{self.n_ctx}: no room to generate (shorten the prompt or start the "
                    "server with a larger --ctx-size)"
                ) from exc
            raise ParamError(
                f"the text has at least {exc.at_least} tokens; this server tokenises at most "
                f"{limit} ({COUNT_LIMIT_CONTEXTS} times its context) in one request"
            ) from exc
        except TokenizeCancelled as exc:
            raise ClientGone("the client went away") from exc

    async def tokenize(
        self,
        text: str,
        add_special: bool = True,
        *,
        request: Disconnectable | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """Text to ids off the event loop, stopping early past `limit` (default: the count
        limit) or when the client hangs up."""
        return await self.off_loop(
            lambda cancel: self.tokenize_now(text, add_special, limit=limit, cancel=cancel),
            request,
        )

    @property
    def vision(self) -> bool:
        """Whether the model takes images (it was loaded with a projector)."""
        return self.engine.vision is not None

    def tokenize_media_now(
        self, text: str, images: list[ImageInput], *, limit: int | None = None
    ) -> MediaPrompt:
        """Text with an image marker per image into tokens and image chunks (a worker
        thread); no projector, or more than `limit` tokens, is a ParamError."""
        try:
            media = self.engine.tokenize_media(text, images)
        except VisionError as exc:
            raise ParamError(str(exc)) from exc
        limit = self.n_ctx - 1 if limit is None else limit
        if len(media.tokens) > limit:
            raise ParamError(
                f"the prompt has {len(media.tokens)} tokens (images included) but the context "
                f"holds {self.n_ctx}: no room to generate"
            )
        return media

    def detokenize_now(self, tokens: list[int]) -> str:
        """Token ids to text; ids outside the vocabulary are a ParamError, not a crash."""
        bad = [t for t in tokens if not self.engine.model.valid_token(t)]
        if bad:
            raise ParamError(f"token ids outside the vocabulary: {bad[:5]}")
        return self.engine.detokenize(tokens)

    async def detokenize(self, tokens: list[int], request: Disconnectable | None = None) -> str:
        return await self.off_loop(lambda _cancel: self.detokenize_now(tokens), request)

    async def embed(
        self,
        inputs: list[list[int]] | list[str],
        *,
        truncate: bool = False,
        normalize: bool = True,
        request: Disconnectable | None = None,
    ) -> Embeddings:
        """Embed texts or token lists, off the event loop (serving/embeddings.py)."""
        return await embeddings.embed(
            self, inputs, truncate=truncate, normalize=normalize, request=request
        )

    async def rerank(
        self, query: str, documents: list[str], *, request: Disconnectable | None = None
    ) -> Embeddings:
        """Score `documents` against `query` with a reranker (serving/embeddings.py)."""
        return await embeddings.rerank(self, query, documents, request=request)

    async def off_loop_embed(
        self, work: Callable[[threading.Event], T], request: Disconnectable | None = None
    ) -> T:
        """`off_loop` on the embedding thread: a batch of 64 inputs must not hold one of the
        few workers that tokenise every other request."""
        self.check_open()
        self.touch()
        if self._embed_pool is None:
            self._embed_pool = ThreadPoolExecutor(1, thread_name_prefix="innkeeper-embed")
        return await self.off_loop(work, request, pool=self._embed_pool)

    def check_grammar_now(self, grammar: str | None) -> None:
        """Bound and compile a client grammar (a ParamError if it is bad or too costly)."""
        if not grammar or grammar in self._grammars_ok:
            return
        try:
            check_grammar(self.engine.model, grammar)
        except GrammarError as exc:
            raise ParamError(str(exc)) from exc
        self._grammars_ok[grammar] = None
        while len(self._grammars_ok) > GRAMMARS_REMEMBERED:
            self._grammars_ok.popitem(last=False)

    async def check_grammar(self, grammar: str | None) -> None:
        """`check_grammar_now` off the event loop; routes call it before `start`."""
        if grammar and grammar not in self._grammars_ok:
            await self.off_loop(lambda _cancel: self.check_grammar_now(grammar))

    def check_lengths(self, gen: Generation) -> None:
        """No length spelling may ask for more than the context holds (prompt_fit.py)."""
        check_lengths(gen, self.n_ctx)

    def prepare(
        self,
        prompt: list[int],
        gen: Generation,
        default_max_tokens: int | None = None,
        media: MediaPrompt | None = None,
    ) -> tuple[list[int], int]:
        """Everything about one prompt that can be wrong, checked before anything starts:
        returns (prompt, max_tokens) or raises ParamError. With `media`, `prompt` is its
        tokens (markers, not token ids, where the images go)."""
        if gen.max_tokens is None and default_max_tokens is not None:
            gen.max_tokens = default_max_tokens
        prompt, max_tokens = fit_prompt(prompt, gen, self.n_ctx, self.engine.model.bos, media)
        for tok in prompt if media is None else media.text_tokens():
            if not self.engine.model.valid_token(tok):
                raise ParamError(f"token id {tok} is outside the vocabulary")
        return prompt, max_tokens

    def start(
        self,
        prompt: list[int],
        gen: Generation,
        *,
        default_max_tokens: int | None = None,
        n_logprobs: int = 0,
        genkey: str | None = None,
        slot: int = -1,
        media: MediaPrompt | None = None,
    ) -> RunningGeneration:
        """Queue one generation; `slot` pins it to that slot (waiting for it), -1: any;
        `media`: the prompt has images (`prompt` is `media.tokens`)."""
        if self.kind != "chat":
            raise ParamError(
                f"model {self.model_id!r} is an {self.kind} model: it answers /v1/embeddings, "
                "/embedding, /api/embed (and /rerank), not generation"
            )
        prompt, max_tokens = self.prepare(prompt, gen, default_max_tokens, media)
        # Routes check the grammar off the loop first (`check_grammar`); this is then a lookup.
        self.check_grammar_now(gen.params.grammar)
        inbox = EventInbox(asyncio.get_running_loop())
        req = GenerationRequest(
            prompt=prompt,
            params=gen.params,
            max_tokens=max_tokens,
            on_event=inbox.put,
            stop=gen.stop,
            banned_strings=gen.banned_strings,
            n_logprobs=max(n_logprobs, gen.n_probs),
            min_tokens=gen.min_tokens,
            slot=slot,
            media=media,
        )
        running = RunningGeneration(request=req, queue=inbox, genkey=genkey)
        self.check_open()
        self.touch()
        if self.request_timeout:
            running.timeout = self.request_timeout
            running.deadline = time.monotonic() + self.request_timeout
        try:
            self.engine.submit(req)
        except QueueFullError as exc:
            raise ModelBusy(
                f"the server is busy ({exc}); try again shortly", retry_after=2
            ) from exc
        except EngineLost as exc:  # wrecked from another thread since `check_open`
            raise WorkerLost(exc.message) from exc
        self.runs.add(running)
        return running

    def done(self, running: RunningGeneration) -> None:
        """Forget a run whose response is over (its owner may still poll it by genkey)."""
        if self.runs.end(running):
            self.touch()

    def release(self, runs: Iterable[RunningGeneration]) -> None:
        """Undo started runs whose request failed as a whole: cancel and forget each one."""
        self.runs.release(runs)

    @property
    def in_flight(self) -> int:
        """Runs started and not yet answered (0 when idle: nothing may leak here)."""
        return len(self.runs)

    def abort(self, genkey: str | None = None) -> int:
        """Stop running generations (all, or those started with `genkey`)."""
        return self.runs.abort(genkey)

    def progress(self, genkey: str | None = None) -> str:
        """KoboldCpp's /api/extra/generate/check: the text generated so far (runs.py)."""
        return self.runs.progress(genkey)

    async def collect(self, request: Disconnectable, running: RunningGeneration) -> FinishEvent:
        """Wait for a non-streaming generation; a client that hangs up cancels it."""

        async def drain() -> FinishEvent:
            async for ev in running.events():
                if isinstance(ev, FinishEvent):
                    return ev
            raise RuntimeError("generation ended without a finish event")  # pragma: no cover

        drain_task = asyncio.create_task(drain())
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({drain_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if drain_task not in done:
                log.info("client went away: cancelling request %d", running.request.id)
                running.cancel()
            return await drain_task
        finally:
            if not drain_task.done():
                running.cancel()
                drain_task.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            self.done(running)


def _retrieve(future: asyncio.Future[object]) -> None:
    """Collect an abandoned future's exception so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


async def _wait_disconnect(request: Disconnectable) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

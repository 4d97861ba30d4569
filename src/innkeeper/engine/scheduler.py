"""The engine loop: admission, one batch and one decode a step.

One engine thread owns the llama.cpp context. Every step it makes one `llama_decode` that
carries the next token of every generating sequence plus a chunk of any pending prompt
(chunked prefill, so a long new prompt does not freeze the other streams), then samples
each sequence with its own sampler chain (generation.py). Requests wait in a FIFO queue for
a free slot (slots.py).

Each slot is one KV-cache sequence and remembers the tokens it holds. A new request goes to
the free slot whose cache shares the longest prefix with its prompt, and only the rest is
evaluated (prefix_reuse.py).

A prompt with images (vision.py) holds markers where the images go: prefix matching treats
them as tokens, and prompt evaluation decodes each image, when it reaches it, in a decode of
its own before the step's batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from innkeeper.engine.backend import Batch, Context, Model
from innkeeper.engine.events import (
    EngineLost,
    ErrorKind,
    Event,
    FinishEvent,
    GenerationRequest,
    Timings,
)
from innkeeper.engine.generation import Generation, Perf, TokenPipeline
from innkeeper.engine.kv_stash import KVStash
from innkeeper.engine.prefix_reuse import PrefixReuse
from innkeeper.engine.sampling import GrammarError, SamplerChain
from innkeeper.engine.slots import GENERATING, IDLE, PROMPT, Slot
from innkeeper.engine.vision import Vision

__all__ = ["Perf", "QueueFullError", "Scheduler"]

log = logging.getLogger("innkeeper.engine")


class QueueFullError(Exception):
    """More requests are waiting than the server accepts (`--max-queue`)."""


class Scheduler:
    """Runs every generation on one thread over one llama.cpp context."""

    def __init__(
        self,
        model: Model,
        ctx: Context,
        n_slots: int,
        *,
        cache_reuse: int = 32,
        max_queue: int = 64,
        cache_ram: int = 2 * 2**30,
        ctx_checkpoints: int = 32,
        vision: Vision | None = None,
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.vision = vision
        self.slots = [Slot(i) for i in range(n_slots)]
        self.max_queue = max_queue
        self.stash = KVStash(ctx, self.slots, cache_ram, ctx_checkpoints)
        self.prefix = PrefixReuse(ctx, self.stash, cache_reuse)
        self.perf = Perf()
        self.tokens = TokenPipeline(model, ctx, self.stash, self.perf)
        self._queue: deque[tuple[GenerationRequest, float]] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._failed: tuple[str, ErrorKind] | None = None  # fail_all's error: refuse the rest
        self._batch = Batch(max(ctx.params.n_batch, n_slots))
        self._thread = threading.Thread(target=self._run, name="innkeeper-engine", daemon=True)

    # ---- public API, any thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; raises QueueFullError when the queue is at its bound."""
        with self._cond:
            if self._failed is not None:  # nothing would ever run it
                raise EngineLost(*self._failed)
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting")
            self._queue.append((req, time.monotonic()))
            self._cond.notify()

    def call(self, work: Callable[[], Any]) -> Future[Any]:
        """Run `work` on the engine thread between two steps (slot files, erase): it may
        touch the context and the slots, which no other thread may. Its result or
        exception arrives through the future."""
        future: Future[Any] = Future()
        with self._cond:
            if self._stop:
                failed = self._failed
                stopping = EngineLost(*failed) if failed else RuntimeError("the engine is stopping")
                future.set_exception(stopping)
                return future
            self._calls.append((work, future))
            self._cond.notify()
        return future

    def cancel_all(self) -> int:
        """Abort every running and queued request; returns how many were asked to stop."""
        n = 0
        with self._cond:
            for req, _ in self._queue:
                req.cancel()
                n += 1
            for slot in self.slots:
                gen = slot.gen
                if gen is not None:
                    gen.req.cancel()
                    n += 1
            self._cond.notify()
        return n

    def fail_all(self, error: str, kind: ErrorKind) -> int:
        """End every running and queued request with `error`, from another thread, for an
        engine whose thread is stuck inside llama.cpp for good (a lost RPC worker): nothing
        here may wait for it. The engine takes no more work; returns how many ended."""
        with self._cond:
            self._stop = True
            self._failed = (error, kind)
            reqs = [req for req, _ in self._queue]
            reqs += [s.gen.req for s in self.slots if s.gen is not None]
            self._queue.clear()
            calls = list(self._calls)
            self._calls.clear()
        for req in reqs:
            # Should the engine thread ever go on, nothing more reaches this consumer.
            on_event, req.on_event = req.on_event, _dropped
            req.cancel()
            timings = Timings(len(req.prompt), 0, 0, 0.0, 0.0, 0.0)
            try:
                on_event(FinishEvent("error", "", timings, -1, error=error, error_kind=kind))
            except Exception:  # a consumer that went away
                log.debug("event consumer failed", exc_info=True)
        for _, future in calls:
            future.set_exception(EngineLost(error, kind))
        return len(reqs)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.state is not IDLE)

    def stop(self, timeout: float = 10.0) -> None:
        self.cancel_all()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- engine thread: the loop -----------------------------------------------------------
    def _run(self) -> None:
        while True:
            # Only this thread changes slot states: while one is busy the loop goes on
            # without taking the lock (a step per token).
            if not self._busy():
                with self._cond:
                    while not self._stop and not self._queue and not self._calls:
                        self.perf.idle_since = time.time()
                        self._cond.wait()
                if self._stop and not self._busy():
                    break
            if self._calls:
                self._run_calls()
            try:
                self._step()
            except Exception as exc:  # one bad step must not kill the server
                log.exception("engine step failed")
                for gen in self._running():
                    self.tokens.finish(
                        gen, "error", error=f"engine error: {exc}", kind=ErrorKind.INTERNAL
                    )
                self.tokens.deliver()
        self._batch.free()
        with self._cond:
            for _, future in self._calls:
                future.set_exception(RuntimeError("the engine stopped"))
            self._calls.clear()

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                work, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:  # the caller gets it; the loop goes on
                future.set_exception(exc)

    def _running(self) -> list[Generation]:
        return [s.gen for s in self.slots if s.gen is not None]

    def _busy(self) -> bool:
        """Whether a slot runs a request (every step: a plain loop, no generator)."""
        for slot in self.slots:  # noqa: SIM110
            if slot.state is not IDLE:
                return True
        return False

    def _step(self) -> None:
        """Admit, build one batch (every sampled token, then prompt chunks), decode it, sample.

        The events of a step go out just before the next decode (TokenPipeline.deliver), or
        at once when the next decode is not about to follow: a request finished, one is
        waiting for admission, or a prompt is being evaluated.
        """
        self._decode_step()
        tokens = self.tokens
        if tokens.outbox and (tokens.urgent or self._queue or self._prompting()):
            tokens.deliver()

    def _prompting(self) -> bool:
        """Whether a running request is still in its prompt (the next decode may be long)."""
        for slot in self.slots:  # noqa: SIM110 (every step: a plain loop, no generator)
            if slot.state is PROMPT:
                return True
        return False

    def _decode_step(self) -> None:
        if self._queue:
            self.tokens.deliver()  # admission may take a while (cache restore, images)
            self._admit()
        finish = self.tokens.finish
        running: list[Generation] = []
        for slot in self.slots:
            gen = slot.gen
            if gen is None:
                continue
            if gen.req.cancelled:
                finish(gen, "abort")
            else:
                running.append(gen)
        if not running:
            return
        self.stash.park_idle()
        running = self._make_room(running)
        batch = self._batch
        batch.clear()
        to_sample: list[tuple[Generation, int]] = []
        prompts: list[Generation] = []
        for gen in running:
            slot = gen.slot
            if slot.state is GENERATING:
                tok = gen.next_token
                to_sample.append((gen, batch.add(tok, len(slot.cache), slot.id, True)))
                slot.cache.append(tok)
            else:
                prompts.append(gen)
        generating = bool(to_sample)
        if prompts:
            self._add_prompt_chunks(prompts, generating, to_sample)
        if batch.n == 0:
            return

        self.tokens.deliver()
        t0 = time.monotonic()
        ret = self.ctx.decode(batch)
        dt = time.monotonic() - t0
        self.perf.decode_steps += 1
        if ret != 0:
            self._decode_failed(ret)
            return
        if generating:
            self.perf.total_decode_seconds += dt
        else:
            self.perf.total_prompt_seconds += dt

        sample = self.tokens.sample
        for gen, idx in to_sample:
            if gen.slot.gen is not gen:
                continue
            if gen.req.cancelled:  # cancelled while an earlier sample ran: skip its own
                finish(gen, "abort")
                continue
            try:
                sample(gen, idx)
            except Exception as exc:  # one request's failure must not end the others
                log.exception("sampling failed for request %d", gen.req.id)
                finish(gen, "error", error=f"engine error: {exc}", kind=ErrorKind.SAMPLING)

    def _add_prompt_chunks(
        self, prompts: list[Generation], generating: bool, to_sample: list[tuple[Generation, int]]
    ) -> None:
        """Fill the rest of the batch with prompt tokens, oldest request first (chunked
        prefill: beside generating streams, at most a ubatch, so they keep their pace)."""
        batch = self._batch
        params = self.ctx.params
        budget = params.n_batch - batch.n
        if generating:
            budget = min(budget, params.n_ubatch)
        budget = min(budget, self._free_cells() - batch.n)
        for gen in sorted(prompts, key=lambda g: g.t_submit):
            if budget <= 0:
                break
            slot = gen.slot
            limit = budget
            media = gen.req.media
            if media is not None:
                if media.image_at(len(slot.cache)) is not None and not self._eval_image(gen):
                    continue
                budget = min(budget, self._free_cells() - batch.n)
                limit = min(budget, media.text_run(len(slot.cache)))
                if limit <= 0:
                    continue
            if gen.checkpoint_at:
                if gen.checkpoint_at[0] <= len(slot.cache):
                    # Every token so far is decoded: the state is the prompt's first n tokens.
                    self.stash.save_checkpoint(slot)
                    gen.checkpoint_at = [p for p in gen.checkpoint_at if p > len(slot.cache)]
                if gen.checkpoint_at:
                    limit = min(limit, gen.checkpoint_at[0] - len(slot.cache))
            chunk = gen.pending[:limit]
            done = len(chunk) == len(gen.pending)
            idx = batch.add_span(chunk, len(slot.cache), slot.id, done)
            slot.cache.extend(chunk)
            del gen.pending[: len(chunk)]
            budget -= len(chunk)
            if done:
                slot.prompt_done()
                to_sample.append((gen, idx))

    def _eval_image(self, gen: Generation) -> bool:
        """Decode the image at the head of `gen`'s pending prompt into its slot, in decodes
        of its own (an embeddings batch cannot share the token batch); False if it failed."""
        slot = gen.slot
        media = gen.req.media
        span = media.image_at(len(slot.cache)) if media is not None else None
        assert span is not None and self.vision is not None
        t0 = time.monotonic()
        try:
            self.vision.eval_image(self.ctx, span, slot.id)
        except Exception as exc:
            log.error("request %d: %s", gen.req.id, exc)
            # The sequence may hold part of the image: drop everything from its start.
            self.ctx.seq_rm(slot.id, span.start, -1)
            self.tokens.finish(gen, "error", error=str(exc), kind=ErrorKind.INTERNAL)
            return False
        self.perf.total_prompt_seconds += time.monotonic() - t0
        n = span.end - span.start
        slot.cache.extend(gen.pending[:n])
        del gen.pending[:n]
        return True

    def _free_cells(self) -> int:
        used = 0
        for slot in self.slots:
            used += len(slot.cache)
        return self.ctx.n_ctx - used

    def _make_room(self, running: list[Generation]) -> list[Generation]:
        """Keep every generating sequence's next token within the context's cells.

        Idle slots hold no cells here (they were just parked), and a sequence is ended one
        token before the context's end when it samples; so only several sequences together
        can run out: the longest one then finishes with reason "length".
        """
        if self._free_cells() >= len(running):
            return running  # the common case, without counting the generating ones
        generating = [g for g in running if g.slot.state is GENERATING]
        while generating and self._free_cells() < len(generating):
            victim = max(generating, key=lambda g: len(g.slot.cache))
            log.warning("context full: ending request %d early", victim.req.id)
            self.tokens.finish(victim, "length")
            generating.remove(victim)
        return self._running()

    def _decode_failed(self, ret: int) -> None:
        msg = "the KV cache is full" if ret == 1 else f"llama_decode failed with status {ret}"
        log.error("decode failed: %s", msg)
        kind = ErrorKind.CONTEXT_OVERFLOW if ret == 1 else ErrorKind.INTERNAL
        for gen in self._running():
            # The cache state of these sequences is unknown now: drop it.
            gen.slot.forget(self.ctx)
            self.tokens.finish(gen, "error", error=msg, kind=kind)

    # ---- engine thread: admission -----------------------------------------------------------
    def _admit(self) -> None:
        while True:
            with self._cond:
                picked = self._next_admissible()
                if picked is None:
                    return
                req, t_submit, free = picked
            if req.cancelled:
                self.tokens.finish_unstarted(req, "abort")
                continue
            slot = self.prefix.choose_slot(free, req.prompt)
            try:
                self._start(slot, req, t_submit)
            except GrammarError as exc:
                self.tokens.finish_unstarted(req, "error", str(exc), ErrorKind.GRAMMAR)
            except Exception as exc:  # a request that cannot start fails alone (slot stays IDLE)
                log.exception("request %d could not start", req.id)
                self.tokens.finish_unstarted(
                    req, "error", f"engine error: {exc}", ErrorKind.INTERNAL
                )

    def _next_admissible(self) -> tuple[GenerationRequest, float, list[Slot]] | None:
        """Take the oldest queued request that can start now, with the free slots it may
        use (under the lock). FIFO, except that a request pinned to a busy slot (id_slot)
        lets later ones take the other free slots instead of holding them up."""
        idle = [s for s in self.slots if s.state is IDLE]
        for i, (req, t_submit) in enumerate(self._queue):
            free = [s for s in idle if req.slot in (-1, s.id)]
            if free or req.cancelled:
                del self._queue[i]
                return req, t_submit, free
            if not idle:
                return None  # no slot is free: only a cancelled head could leave now
        return None

    def _start(self, slot: Slot, req: GenerationRequest, t_submit: float) -> None:
        p = req.params
        seed = p.resolved_seed()
        chain = SamplerChain(self.model, p, seed, self.ctx.n_ctx)
        chain.accept_prompt(req.prompt)
        gen = Generation(req, slot, chain, seed)
        gen.t_submit = t_submit
        gen.t_admit = time.monotonic()
        n_past = self.prefix.reuse(slot, req.prompt, req.id, req.media)
        gen.n_cached = n_past
        gen.pending = req.prompt[n_past:]
        if self.stash.n_checkpoints:
            # As llama-server: checkpoints a ubatch (+4) and 4 tokens before the prompt's end,
            # so a regenerate or an edited last message finds one close to its prefix.
            n = len(req.prompt)
            ub = min(self.ctx.params.n_ubatch, self.ctx.params.n_batch)
            gen.checkpoint_at = sorted({p for p in (n - 4 - ub, n - 4) if p > n_past})
        slot.start(gen)
        log.info(
            "request %d on slot %d: %d prompt tokens, %d reused from cache, %d to evaluate",
            req.id,
            slot.id,
            len(req.prompt),
            n_past,
            len(gen.pending),
        )


def _dropped(_event: Event) -> None:
    """The consumer of a request that `fail_all` already ended."""

"""Slots, continuous batching, prefix reuse, context shift and cancellation.

One engine thread owns the llama.cpp context. Every step it makes one `llama_decode` that
carries the next token of every generating sequence plus a chunk of any pending prompt
(chunked prefill, so a long new prompt does not freeze the other streams), then samples
each sequence with its own sampler chain. Requests wait in a FIFO queue for a free slot.

Each slot is one KV-cache sequence and remembers the tokens it holds. A new request goes to
the free slot whose cache shares the longest prefix with its prompt; only the rest is
evaluated. When SillyTavern trims old messages from the top of the prompt, the chunks that
are still there are moved into place with `seq_rm`/`seq_add` (what llama-server calls
`--cache-reuse`) instead of being evaluated again.

Models whose memory forgets (sliding-window layers with swa_full off, recurrent state) keep
only the last window of each sequence, so a prompt that diverges earlier cannot continue from
the cache alone. As llama-server does, each slot keeps a few context checkpoints (the partial
state, `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`) saved near the end of each prompt and after each
reply; reuse restores the newest one at or before the shared prefix, else evaluates afresh.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from innkeeper.engine.backend import Batch, Context, Model
from innkeeper.engine.events import (
    ErrorKind,
    FinishEvent,
    GenerationRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
)
from innkeeper.engine.sampling import GrammarError, SamplerChain
from innkeeper.engine.textstream import Rollback, TextStream

log = logging.getLogger("innkeeper.engine")

# A cached slot is reused for a new prompt when they share this fraction of the prompt
# (llama-server's --slot-prompt-similarity); otherwise the least recently used slot is taken
# so that other conversations keep their caches.
SIMILARITY_THRESHOLD = 0.1
# A grammar-constrained sample slower than this ends its request (see _sample).
GRAMMAR_STEP_LIMIT_S = 2.0


class QueueFullError(Exception):
    """More requests are waiting than the server accepts (`--max-queue`)."""


@dataclass
class Perf:
    """Counters for /api/extra/perf and /metrics (written by the engine thread only)."""

    started: float = field(default_factory=time.time)
    total_requests: int = 0
    total_prompt_tokens: int = 0
    total_cached_tokens: int = 0
    total_generated_tokens: int = 0
    total_prompt_seconds: float = 0.0
    total_decode_seconds: float = 0.0
    total_aborted: int = 0
    total_errors: int = 0
    decode_steps: int = 0
    last_prompt_seconds: float = 0.0
    last_eval_seconds: float = 0.0
    last_token_count: int = 0
    last_input_count: int = 0
    last_seed: int = 0
    last_stop_reason: int = -1  # KoboldCpp: -1 invalid, 0 length, 1 EOS, 2 stop string
    last_tokens_per_second: float = 0.0
    idle_since: float = field(default_factory=time.time)


class _Active:
    """The per-request state while a request owns a slot."""

    __slots__ = (
        "bans",
        "chain",
        "checkpoint_at",
        "eos",
        "n_cached",
        "next_token",
        "pending",
        "req",
        "seed",
        "slot",
        "stream",
        "t_admit",
        "t_first",
        "t_submit",
    )

    def __init__(self, req: GenerationRequest, slot: _Slot, chain: SamplerChain, seed: int) -> None:
        self.req = req
        self.slot = slot
        self.chain = chain
        self.seed = seed
        self.pending: list[int] = []
        self.next_token: int | None = None
        self.stream = TextStream(req.stop, req.banned_strings)  # generated tokens and text
        self.bans: dict[int, set[int]] = {}
        self.n_cached = 0
        self.t_submit = 0.0
        self.t_admit = 0.0
        self.t_first = 0.0
        self.eos = False
        self.checkpoint_at: list[int] = []  # cache lengths at which to save a checkpoint


@dataclass
class _Parked:
    """A conversation's KV state moved to host memory while other slots decode.

    With one cache shared by all slots, every decode step attends over every occupied
    cell, so idle conversations left in the cache slow the active ones. They are parked
    in RAM instead (llama-server's --cache-ram) and restored in milliseconds on return.
    """

    tokens: list[int]
    data: object
    size: int
    last_used: float
    checkpoints: list[_Checkpoint] = field(default_factory=list)

    @property
    def ram(self) -> int:
        return self.size + sum(c.size for c in self.checkpoints)


@dataclass
class _Checkpoint:
    """A slot's partial state (sliding-window cells / recurrent state) after `n_tokens` tokens.

    Restored over the full-attention cells, which still hold every position, it lets the
    sequence continue from `n_tokens` although the window has moved on since.
    """

    n_tokens: int
    pos_min: int
    data: object
    size: int


class _Slot:
    __slots__ = ("active", "cache", "checkpoints", "id", "last_used")

    def __init__(self, seq: int) -> None:
        self.id = seq
        self.cache: list[int] = []  # tokens whose K/V are in this sequence, positions 0..n-1
        self.checkpoints: list[_Checkpoint] = []  # oldest first, n_tokens ascending
        self.active: _Active | None = None
        self.last_used = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.cache_reuse = cache_reuse if ctx.can_shift else 0
        self.trim_needs_shift = cache_reuse > 0 and not ctx.can_shift
        # Checkpoints only where the memory forgets: a full-size cache reuses without them.
        self.n_checkpoints = ctx_checkpoints if ctx.partial_memory else 0
        if self.trim_needs_shift:
            log.info(
                "this model's cache cannot be shifted (sliding-window or recurrent layers): "
                "a prompt trimmed at the top is evaluated again after the common prefix "
                "(--swa-full allows shifting, at the cost of a full-size cache)"
            )
        self.max_queue = max_queue
        self.cache_ram = cache_ram
        self.parked: list[_Parked] = []
        self.perf = Perf()
        self._queue: deque[tuple[GenerationRequest, float]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._batch = Batch(max(ctx.params.n_batch, n_slots))
        self._thread = threading.Thread(target=self._run, name="innkeeper-engine", daemon=True)

    # ---- public API, any thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request; raises QueueFullError when the queue is at its bound."""
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting")
            self._queue.append((req, time.monotonic()))
            self._cond.notify()

    def cancel_all(self) -> int:
        """Abort every running and queued request; returns how many were asked to stop."""
        n = 0
        with self._cond:
            for req, _ in self._queue:
                req.cancel()
                n += 1
            for slot in self.slots:
                if slot.active is not None:
                    slot.active.req.cancel()
                    n += 1
            self._cond.notify()
        return n

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.active is not None)

    def stop(self, timeout: float = 10.0) -> None:
        self.cancel_all()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and self.busy_slots == 0:
                    self.perf.idle_since = time.time()
                    self._cond.wait()
                if self._stop and self.busy_slots == 0:
                    break
            try:
                self._step()
            except Exception as exc:  # one bad step must not kill the server
                log.exception("engine step failed")
                for slot in self.slots:
                    if slot.active is not None:
                        self._finish(
                            slot.active,
                            "error",
                            error=f"engine error: {exc}",
                            kind=ErrorKind.INTERNAL,
                        )
        self._batch.free()

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    return
                free = [s for s in self.slots if s.active is None]
                req, t_submit = self._queue[0]
                if not free and not req.cancelled:
                    return
                self._queue.popleft()
            if req.cancelled:
                self._emit_finish_unstarted(req, "abort")
                continue
            slot = self._choose_slot(free, req.prompt)
            try:
                self._start(slot, req, t_submit)
            except GrammarError as exc:
                self._emit_finish_unstarted(req, "error", str(exc), ErrorKind.GRAMMAR)
            except Exception as exc:  # a request that cannot start fails alone
                log.exception("request %d could not start", req.id)
                slot.active = None
                self._emit_finish_unstarted(
                    req, "error", f"engine error: {exc}", ErrorKind.INTERNAL
                )

    def _choose_slot(self, free: list[_Slot], prompt: list[int]) -> _Slot:
        """The free slot whose cache (live, or parked in RAM) shares most with the prompt."""
        best = max(free, key=lambda s: common_prefix(s.cache, prompt))
        shared = common_prefix(best.cache, prompt)
        parked = max(self.parked, key=lambda p: common_prefix(p.tokens, prompt), default=None)
        parked_shared = common_prefix(parked.tokens, prompt) if parked else 0
        threshold = SIMILARITY_THRESHOLD * len(prompt)
        if parked is not None and parked_shared > shared and parked_shared >= threshold:
            slot = min(free, key=lambda s: (len(s.cache) > 0, s.last_used))
            self._restore(slot, parked)
            return slot
        if shared > 0 and shared >= threshold:
            return best
        # No useful prefix: take an empty slot, else the least recently used one.
        return min(free, key=lambda s: (len(s.cache) > 0, s.last_used))

    def _park_idle(self) -> None:
        """Move idle slots' caches to RAM while other slots are decoding."""
        for slot in self.slots:
            if slot.active is None and slot.cache:
                self._park(slot)

    def _park(self, slot: _Slot) -> None:
        tokens = list(slot.cache)
        checkpoints = list(slot.checkpoints)
        saved = self.ctx.seq_save(slot.id) if len(tokens) >= 2 * max(self.cache_reuse, 16) else None
        self._drop_cache(slot)
        if saved is None or saved[1] > self.cache_ram:
            return
        data, size = saved
        # A state that extends an older parked one replaces it.
        self.parked = [p for p in self.parked if common_prefix(p.tokens, tokens) < len(p.tokens)]
        self.parked.append(_Parked(tokens, data, size, slot.last_used, checkpoints))
        self.parked.sort(key=lambda p: p.last_used)
        self._fit_ram()
        log.info(
            "slot %d: parked %d cached tokens in RAM (%.1f MiB, %d checkpoints)",
            slot.id,
            len(tokens),
            size / 2**20,
            len(checkpoints),
        )

    def _drop_cache(self, slot: _Slot) -> None:
        """Forget a slot's sequence: its cells, its tokens and its checkpoints."""
        self.ctx.seq_rm(slot.id, -1, -1)
        slot.cache.clear()
        slot.checkpoints.clear()

    def ram_used(self) -> int:
        """Host bytes held for --cache-ram: parked states and every slot's checkpoints."""
        live = sum(c.size for s in self.slots for c in s.checkpoints)
        return live + sum(p.ram for p in self.parked)

    def _fit_ram(self) -> None:
        """Keep parked states and checkpoints within --cache-ram: the least recently used
        parked conversation goes first, then the oldest checkpoint of any slot."""
        while self.ram_used() > self.cache_ram:
            if self.parked:
                self.parked.pop(0)
                continue
            slot = max(
                (s for s in self.slots if s.checkpoints), key=lambda s: s.checkpoints[0].size
            )
            slot.checkpoints.pop(0)

    def _save_checkpoint(self, slot: _Slot) -> None:
        """Save the slot's partial state at its current length (llama-server's checkpoints)."""
        n = len(slot.cache)
        if n == 0 or (slot.checkpoints and slot.checkpoints[-1].n_tokens >= n):
            return
        pos_min = self.ctx.seq_pos_min(slot.id)
        if pos_min < 0:
            return
        saved = self.ctx.seq_save(slot.id, partial=True)
        if saved is None or saved[1] > self.cache_ram:
            return
        if self.ctx.n_swa:
            # llama.cpp saves only the cells the window still sees: that is what comes back.
            pos_min = max(pos_min, n - self.ctx.n_swa)
        while len(slot.checkpoints) >= self.n_checkpoints:
            slot.checkpoints.pop(0)
        slot.checkpoints.append(_Checkpoint(n, pos_min, saved[0], saved[1]))
        self._fit_ram()
        log.debug(
            "slot %d: checkpoint at %d tokens (pos_min %d, %.1f MiB, %d kept)",
            slot.id,
            n,
            pos_min,
            saved[1] / 2**20,
            len(slot.checkpoints),
        )

    def _holds_past(self, pos_min: int, n_past: int) -> bool:
        """Whether a memory whose oldest position is `pos_min` can continue after `n_past`
        tokens: sliding-window layers need the last window before it, recurrent state must
        stand exactly at it (its newest position is n_past - 1)."""
        if pos_min < 0:
            return n_past == 0
        if self.ctx.n_swa > 0:
            return pos_min <= max(0, n_past - self.ctx.n_swa)
        return pos_min < n_past

    def _restore(self, slot: _Slot, parked: _Parked) -> None:
        if slot.cache:
            self._park(slot)
        self.parked.remove(parked)
        self._drop_cache(slot)
        if self.ctx.seq_restore(slot.id, parked.data, parked.size):  # type: ignore[arg-type]
            slot.cache[:] = parked.tokens
            slot.checkpoints[:] = parked.checkpoints
            log.info("slot %d: restored %d cached tokens from RAM", slot.id, len(parked.tokens))
        else:
            log.warning(
                "slot %d: no room to restore %d parked tokens: they are evaluated again",
                slot.id,
                len(parked.tokens),
            )
            self._drop_cache(slot)

    def _start(self, slot: _Slot, req: GenerationRequest, t_submit: float) -> None:
        p = req.params
        seed = p.resolved_seed()
        chain = SamplerChain(self.model, p, seed, self.ctx.n_ctx)
        chain.accept_prompt(req.prompt)
        act = _Active(req, slot, chain, seed)
        act.t_submit = t_submit
        act.t_admit = time.monotonic()
        n_past = self._reuse(slot, req.prompt, req.id)
        act.n_cached = n_past
        act.pending = req.prompt[n_past:]
        if self.n_checkpoints:
            # As llama-server: checkpoints a ubatch (+4) and 4 tokens before the prompt's end,
            # so a regenerate or an edited last message finds one close to its prefix.
            n = len(req.prompt)
            ub = min(self.ctx.params.n_ubatch, self.ctx.params.n_batch)
            act.checkpoint_at = sorted({p for p in (n - 4 - ub, n - 4) if p > n_past})
        slot.active = act
        log.info(
            "request %d on slot %d: %d prompt tokens, %d reused from cache, %d to evaluate",
            req.id,
            slot.id,
            len(req.prompt),
            n_past,
            len(act.pending),
        )

    def _reuse(self, slot: _Slot, prompt: list[int], req_id: int = 0) -> int:
        """Keep what the slot's cache can give this prompt; returns tokens kept."""
        cache = slot.cache
        n_past = common_prefix(cache, prompt)
        if self.cache_reuse and n_past < len(cache) and n_past < len(prompt):
            n_past = self._reuse_chunks(slot, prompt, n_past)
        elif self.trim_needs_shift and _moved_later(cache, prompt, n_past):
            log.info(
                "request %d: the prompt leaves the cache after %d tokens and this model's "
                "cache cannot be shifted: the other %d tokens are evaluated",
                req_id,
                n_past,
                len(prompt) - n_past,
            )
        if n_past >= len(prompt):
            n_past = len(prompt) - 1  # the last prompt token must be evaluated for its logits
        if self.ctx.partial_memory and n_past > 0:
            n_past = self._past_from_memory(slot, n_past, req_id)
        # Checkpoints past the kept prefix describe another continuation.
        slot.checkpoints[:] = [c for c in slot.checkpoints if c.n_tokens <= n_past]
        if not self.ctx.seq_rm(slot.id, n_past, -1):
            log.warning(
                "request %d: the cache cannot drop its tail after %d tokens: "
                "evaluating the whole prompt",
                req_id,
                n_past,
            )
            self._drop_cache(slot)
            n_past = 0
        del slot.cache[n_past:]
        return n_past

    def _past_from_memory(self, slot: _Slot, n_past: int, req_id: int) -> int:
        """How much of a shared prefix a forgetting memory can still continue from.

        The memory holds positions from `seq_pos_min` on. When the prefix needs older ones,
        the newest checkpoint at or before it is restored; without one, evaluate afresh.
        """
        if self._holds_past(self.ctx.seq_pos_min(slot.id), n_past):
            return n_past
        for ck in reversed(slot.checkpoints):
            if ck.n_tokens > n_past or not self._holds_past(ck.pos_min, ck.n_tokens):
                continue
            if self.ctx.seq_restore(slot.id, ck.data, ck.size, partial=True):  # type: ignore[arg-type]
                log.info(
                    "request %d: restored the checkpoint at %d tokens on slot %d "
                    "(the window had moved past the %d shared tokens)",
                    req_id,
                    ck.n_tokens,
                    slot.id,
                    n_past,
                )
                return ck.n_tokens
            break
        log.warning(
            "request %d: slot %d no longer holds the positions before its %d shared tokens "
            "(sliding-window or recurrent memory) and no checkpoint fits: evaluating the "
            "whole prompt",
            req_id,
            slot.id,
            n_past,
        )
        self._drop_cache(slot)
        return 0

    def _reuse_chunks(self, slot: _Slot, prompt: list[int], n_past: int) -> int:
        """Shift cached chunks that reappear later in the prompt into their new positions.

        After a top-trim, the prompt is the kept head, then messages the cache also holds
        but further right. Walk both: skip cache tokens that the prompt dropped, and move
        every run of at least `cache_reuse` matching tokens left with `seq_add`.
        """
        cache = slot.cache
        kept = cache[:n_past]
        head_c = head_p = n_past
        moved = 0
        while head_c < len(cache) and head_p < len(prompt):
            n = 0
            while (
                head_c + n < len(cache)
                and head_p + n < len(prompt)
                and cache[head_c + n] == prompt[head_p + n]
            ):
                n += 1
            if n >= self.cache_reuse:
                shift = head_p - head_c
                self.ctx.seq_rm(slot.id, head_p, head_c)
                self.ctx.seq_add(slot.id, head_c, head_c + n, shift)
                kept.extend(cache[head_c : head_c + n])
                head_c += n
                head_p += n
                moved += n
            else:
                head_c += 1
        if moved:
            log.info("slot %d: shifted %d cached tokens after a prompt trim", slot.id, moved)
        slot.cache[:] = kept[:head_p]
        return head_p

    def _active(self) -> list[_Active]:
        return [s.active for s in self.slots if s.active is not None]

    def _step(self) -> None:
        self._admit()
        for act in self._active():
            if act.req.cancelled:
                self._finish(act, "abort")
        active = self._active()
        if not active:
            return
        self._park_idle()
        self._make_room(active)
        active = self._active()
        batch = self._batch
        batch.clear()
        to_sample: list[tuple[_Active, int]] = []
        for act in active:
            if act.next_token is not None:
                slot = act.slot
                idx = batch.add(act.next_token, len(slot.cache), slot.id, True)
                slot.cache.append(act.next_token)
                act.next_token = None
                to_sample.append((act, idx))
        generating = bool(to_sample)
        budget = self.ctx.params.n_batch - batch.n
        if generating:
            budget = min(budget, self.ctx.params.n_ubatch)
        budget = min(budget, self._free_cells() - batch.n)
        for act in sorted(active, key=lambda a: a.t_submit):
            if not act.pending or budget <= 0:
                continue
            slot = act.slot
            limit = budget
            if act.checkpoint_at:
                if act.checkpoint_at[0] <= len(slot.cache):
                    # Every token so far is decoded: the state is the prompt's first n tokens.
                    self._save_checkpoint(slot)
                    act.checkpoint_at = [p for p in act.checkpoint_at if p > len(slot.cache)]
                if act.checkpoint_at:
                    limit = min(limit, act.checkpoint_at[0] - len(slot.cache))
            chunk = act.pending[:limit]
            done = len(chunk) == len(act.pending)
            idx = batch.add_span(chunk, len(slot.cache), slot.id, done)
            slot.cache.extend(chunk)
            del act.pending[: len(chunk)]
            budget -= len(chunk)
            if done:
                to_sample.append((act, idx))
        if batch.n == 0:
            return

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

        for act, idx in to_sample:
            if act.slot.active is not act:
                continue
            if act.req.cancelled:  # cancelled while an earlier sample ran: skip its own
                self._finish(act, "abort")
                continue
            try:
                self._sample(act, idx)
            except Exception as exc:  # one request's failure must not end the others
                log.exception("sampling failed for request %d", act.req.id)
                self._finish(act, "error", error=f"engine error: {exc}", kind=ErrorKind.SAMPLING)

    def _free_cells(self) -> int:
        return self.ctx.n_ctx - sum(len(s.cache) for s in self.slots)

    def _make_room(self, active: list[_Active]) -> None:
        """Keep the cached tokens of all slots within the context's cells.

        Idle slots' caches go first (least recently used first); a generating sequence that
        reached the end of the context finishes with reason "length".
        """
        need = sum(1 for a in active if a.next_token is not None)
        if any(a.pending for a in active):
            need += 1
        idle = sorted(
            (s for s in self.slots if s.active is None and s.cache), key=lambda s: s.last_used
        )
        while self._free_cells() < need and idle:
            self._drop_cache(idle.pop(0))
        for act in active:
            if act.next_token is not None and len(act.slot.cache) + 1 > self.ctx.n_ctx:
                self._finish(act, "length")
        while self._free_cells() < sum(1 for a in self._active() if a.next_token is not None):
            victim = max(self._active(), key=lambda a: len(a.slot.cache))
            log.warning("context full: ending request %d early", victim.req.id)
            self._finish(victim, "length")

    def _decode_failed(self, ret: int) -> None:
        msg = "the KV cache is full" if ret == 1 else f"llama_decode failed with status {ret}"
        log.error("decode failed: %s", msg)
        for act in self._active():
            # The cache state of these sequences is unknown now: drop it.
            self._drop_cache(act.slot)
            kind = ErrorKind.CONTEXT_OVERFLOW if ret == 1 else ErrorKind.INTERNAL
            self._finish(act, "error", error=msg, kind=kind)

    def _sample(self, act: _Active, idx: int) -> None:
        slot = act.slot
        pos = len(slot.cache)
        banned = act.bans.get(pos)
        n_generated = len(act.stream.tokens)
        if banned or (act.req.min_tokens and n_generated < act.req.min_tokens):
            row = self.ctx.logits(idx)
            for tok in banned or ():
                row[tok] = -math.inf
            if act.req.min_tokens and n_generated < act.req.min_tokens:
                for tok in self.model.eog_tokens:
                    row[tok] = -math.inf
        if act.t_first == 0.0:
            act.t_first = time.monotonic()
        logprobs = self._logprobs(idx, act.req.n_logprobs) if act.req.n_logprobs else None
        t0 = time.monotonic()
        tok = act.chain.sample(self.ctx.ptr, idx)
        took = time.monotonic() - t0
        if act.req.params.grammar and took > GRAMMAR_STEP_LIMIT_S:
            # Static limits keep accepted grammars cheap; this ends one that slipped through
            # after a single slow step instead of letting it hold every slot for minutes.
            log.warning("request %d: one grammar step took %.1f s: ending it", act.req.id, took)
            self._finish(
                act,
                "error",
                error=f"the grammar is too costly to run (one token took {took:.1f} s)",
                kind=ErrorKind.GRAMMAR,
            )
            return
        if act.req.cancelled:
            self._finish(act, "abort")
            return
        if logprobs is not None:
            logprobs = logprobs(tok)
        self._on_token(act, tok, logprobs)

    def _logprobs(self, idx: int, n: int):
        """Log-softmax of the raw logits row; the chosen token is looked up after sampling."""
        import numpy as np

        row = np.ctypeslib.as_array(self.ctx.logits(idx)).astype(np.float64)
        finite = np.isfinite(row)
        mx = row[finite].max()
        lse = mx + math.log(np.exp(row[finite] - mx).sum())
        top = np.argpartition(-row, min(n, row.size - 1))[:n]
        top = top[np.argsort(-row[top])]
        model = self.model
        top_list = tuple(
            TopLogprob(int(t), model.piece(int(t)).decode("utf-8", "replace"), float(row[t] - lse))
            for t in top
        )

        def for_token(tok: int) -> TokenLogprob:
            lp = float(row[tok] - lse) if math.isfinite(row[tok]) else -9999.0
            return TokenLogprob(tok, model.piece(tok).decode("utf-8", "replace"), lp, top_list)

        return for_token

    def _on_token(self, act: _Active, tok: int, logprob: TokenLogprob | None) -> None:
        req = act.req
        stream = act.stream
        if self.model.is_eog(tok):
            act.eos = True
            self._flush(act)
            self._finish(act, "stop")
            return
        stream.push(tok, self.model.piece(tok))
        lps = (logprob,) if logprob is not None else ()

        if req.banned_strings:
            hit = stream.banned_hit()
            if hit is not None:
                self._roll_back(act, stream.roll_back(hit))
                return

        if req.stop:
            found = stream.find_stop()
            if found is not None:
                cut, which = found
                self._emit(act, stream.cut_at(cut), (tok,), lps)
                self._finish(act, "stop", stop_string=which)
                return
        if len(stream.tokens) >= req.max_tokens or len(act.slot.cache) + 1 >= self.ctx.n_ctx:
            self._flush(act, (tok,), lps)
            self._finish(act, "length")
            return
        self._emit(act, stream.ready(), (tok,), lps)
        act.next_token = tok

    def _roll_back(self, act: _Active, rollback: Rollback | None) -> None:
        """Act on a banned string: ban the token that began it at its position and sample
        that position again (KoboldCpp's phrase-ban backtracking), or, once the stream gave
        up rolling back (`None`), end the request where the string starts."""
        if rollback is None:
            self._flush(act)
            self._finish(act, "stop")
            return
        slot = act.slot
        n_prompt = len(act.req.prompt)
        k = rollback.index
        act.bans.setdefault(n_prompt + k, set()).add(rollback.token)
        keep_gen = act.stream.tokens
        # Re-evaluate the token before the banned position so its logits are available again.
        keep = n_prompt + k - 1
        self.ctx.seq_rm(slot.id, keep, -1)
        del slot.cache[keep:]
        act.next_token = (act.req.prompt + keep_gen)[keep]
        # Rebuild the sampler chain so its history matches the rolled-back sequence.
        act.chain.free()
        act.chain = SamplerChain(self.model, act.req.params, act.seed, self.ctx.n_ctx)
        act.chain.accept_prompt(act.req.prompt)
        for t in keep_gen:
            act.chain.accept(t)

    def _emit(self, act: _Active, text: str, tokens: tuple[int, ...], lps: tuple) -> None:
        """Send text the stream has handed out (and counted as sent) with its tokens."""
        if not text and not tokens:
            return
        self._send(act.req, TokenEvent(text=text, tokens=tokens, logprobs=lps))

    def _flush(self, act: _Active, tokens: tuple[int, ...] = (), lps: tuple = ()) -> None:
        self._emit(act, act.stream.flush(), tokens, lps)

    def _send(self, req: GenerationRequest, event: TokenEvent | FinishEvent) -> None:
        try:
            req.on_event(event)
        except Exception:  # a consumer that went away must not stop the engine
            log.debug("event consumer failed", exc_info=True)
            req.cancel()

    def _finish(
        self,
        act: _Active,
        reason: str,
        *,
        stop_string: str | None = None,
        error: str | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        slot = act.slot
        if slot.active is not act:
            return
        now = time.monotonic()
        t_first = act.t_first or now
        timings = Timings(
            prompt_tokens=len(act.req.prompt),
            cached_tokens=act.n_cached,
            completion_tokens=len(act.stream.tokens) + (1 if act.eos else 0),
            prompt_ms=(t_first - act.t_admit) * 1000,
            predicted_ms=(now - t_first) * 1000,
            queued_ms=(act.t_admit - act.t_submit) * 1000,
        )
        act.chain.free()
        if self.n_checkpoints and reason in ("stop", "length") and not act.pending:
            # The next turn of this chat continues from here.
            self._save_checkpoint(slot)
        slot.active = None
        slot.last_used = now
        perf = self.perf
        perf.total_requests += 1
        perf.total_prompt_tokens += timings.prompt_tokens
        perf.total_cached_tokens += timings.cached_tokens
        perf.total_generated_tokens += timings.completion_tokens
        perf.last_prompt_seconds = timings.prompt_ms / 1000
        perf.last_eval_seconds = timings.predicted_ms / 1000
        perf.last_token_count = timings.completion_tokens
        perf.last_input_count = timings.prompt_tokens
        perf.last_seed = act.seed
        perf.last_tokens_per_second = timings.predicted_per_second
        perf.last_stop_reason = {"length": 0, "stop": 2 if stop_string else 1}.get(reason, -1)
        if reason == "abort":
            perf.total_aborted += 1
        elif reason == "error":
            perf.total_errors += 1
        log.info(
            "request %d %s: %d prompt (%d reused), %d generated, %.0f ms prompt, %.1f tok/s",
            act.req.id,
            reason,
            timings.prompt_tokens,
            timings.cached_tokens,
            timings.completion_tokens,
            timings.prompt_ms,
            timings.predicted_per_second,
        )
        self._send(
            act.req,
            FinishEvent(
                reason=reason,
                text=act.stream.text,
                timings=timings,
                seed=act.seed,
                stop_string=stop_string,
                error=error,
                eos=act.eos,
                error_kind=kind,
            ),
        )

    def _emit_finish_unstarted(
        self,
        req: GenerationRequest,
        reason: str,
        error: str | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        timings = Timings(len(req.prompt), 0, 0, 0.0, 0.0, 0.0)
        if reason == "abort":
            self.perf.total_aborted += 1
        self._send(
            req,
            FinishEvent(
                reason=reason, text="", timings=timings, seed=-1, error=error, error_kind=kind
            ),
        )


def _moved_later(cache: list[int], prompt: list[int], n_past: int, probe: int = 32) -> bool:
    """Whether cached tokens after the common prefix reappear further on in the prompt (a
    top-trim), which only shifting the cache could reuse."""
    start = n_past + max(0, (len(cache) - n_past - probe) // 2)
    chunk = cache[start : start + probe]
    if len(chunk) < probe:
        return False
    needle = "," + ",".join(map(str, chunk)) + ","
    return needle in "," + ",".join(map(str, prompt[n_past:])) + ","

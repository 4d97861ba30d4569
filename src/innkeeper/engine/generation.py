"""The per-request token pipeline: sample one token, turn it into text, emit, finish.

After each decode step the scheduler hands every sequence that has logits to
`TokenPipeline.sample`. The token goes through the request's `TextStream` (UTF-8 pieces,
stop strings held back until they can no longer match, banned strings rolled back) and out
as events; a request ends through `finish`, which frees its slot and records its timings.

Events wait in an outbox until the scheduler calls `deliver`, just before the next
`llama_decode` (which releases the GIL): the consumers' threads then run while the model
does, instead of contending with the engine thread for the GIL while it builds the next
batch, and every event of a step reaches its consumers together.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from innkeeper.engine.backend import Context, Model
from innkeeper.engine.events import (
    ErrorKind,
    FinishEvent,
    GenerationRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
)
from innkeeper.engine.kv_stash import KVStash
from innkeeper.engine.sampling import SamplerChain, ban_value
from innkeeper.engine.slots import Slot
from innkeeper.engine.textstream import Rollback, TextStream

log = logging.getLogger("innkeeper.engine")

# A grammar-constrained sample slower than this ends its request (see TokenPipeline.sample).
GRAMMAR_STEP_LIMIT_S = 2.0


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


class Generation:
    """One request's state while it owns a slot."""

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

    def __init__(self, req: GenerationRequest, slot: Slot, chain: SamplerChain, seed: int) -> None:
        self.req = req
        self.slot = slot
        self.chain = chain
        self.seed = seed
        self.pending: list[int] = []  # prompt tokens not yet in the cache
        self.next_token = -1  # the token the next step decodes (while GENERATING)
        self.stream = TextStream(req.stop, req.banned_strings)  # generated tokens and text
        self.bans: dict[int, set[int]] = {}  # position -> tokens banned there
        self.n_cached = 0
        self.t_submit = 0.0
        self.t_admit = 0.0
        self.t_first = 0.0
        self.eos = False
        self.checkpoint_at: list[int] = []  # cache lengths at which to save a checkpoint


class TokenPipeline:
    """Everything that happens to a request between two decode steps (engine thread only)."""

    def __init__(self, model: Model, ctx: Context, stash: KVStash, perf: Perf) -> None:
        self.model = model
        self.ctx = ctx
        self.stash = stash
        self.perf = perf
        self._eog = frozenset(model.eog_tokens)
        self.outbox: list[tuple[GenerationRequest, TokenEvent | FinishEvent]] = []
        self.urgent = False  # a finish event waits: deliver it without waiting for a decode

    def deliver(self) -> None:
        """Hand every waiting event to its request's consumer, in order; a consumer that
        fails is cancelled, not fatal."""
        outbox = self.outbox
        if not outbox:
            return
        self.outbox = []
        self.urgent = False
        for req, event in outbox:
            try:
                req.on_event(event)
            except Exception:  # a consumer that went away must not stop the engine
                log.debug("event consumer failed", exc_info=True)
                req.cancel()

    def sample(self, gen: Generation, idx: int) -> None:
        """Pick the token at batch row `idx` and act on it."""
        req = gen.req
        if gen.bans or req.min_tokens:
            self._ban(gen, idx)
        if gen.t_first == 0.0:
            gen.t_first = time.monotonic()
        logprobs = self._logprobs(idx, req.n_logprobs) if req.n_logprobs else None
        if not req.params.grammar:
            tok = gen.chain.sample(self.ctx.ptr, idx)
        elif (tok := self._sample_grammar(gen, idx)) < 0:
            return
        if req.cancelled:
            self.finish(gen, "abort")
            return
        self._on_token(gen, tok, logprobs(tok) if logprobs is not None else None)

    def _ban(self, gen: Generation, idx: int) -> None:
        """Take out of batch row `idx` the tokens banned at this position (a banned phrase
        rolled back) and, before `min_tokens`, every end-of-generation token."""
        req = gen.req
        banned = gen.bans.get(len(gen.slot.cache))
        early = req.min_tokens and len(gen.stream.tokens) < req.min_tokens
        if not banned and not early:
            return
        row = self.ctx.logits(idx)
        ban = ban_value(req.params)
        for tok in banned or ():
            row[tok] = ban
        if early:
            for tok in self.model.eog_tokens:
                row[tok] = ban

    def _sample_grammar(self, gen: Generation, idx: int) -> int:
        """Sample under a grammar, timed; -1 when the step was too slow and the request ended."""
        req = gen.req
        t0 = time.monotonic()
        tok = gen.chain.sample(self.ctx.ptr, idx)
        took = time.monotonic() - t0
        if took > GRAMMAR_STEP_LIMIT_S:
            # Static limits keep accepted grammars cheap; this ends one that slipped through
            # after a single slow step instead of letting it hold every slot for minutes.
            log.warning("request %d: one grammar step took %.1f s: ending it", req.id, took)
            self.finish(
                gen,
                "error",
                error=f"the grammar is too costly to run (one token took {took:.1f} s)",
                kind=ErrorKind.GRAMMAR,
            )
            return -1
        return tok

    def _logprobs(self, idx: int, n: int) -> Callable[[int], TokenLogprob]:
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

    def _on_token(self, gen: Generation, tok: int, logprob: TokenLogprob | None) -> None:
        req = gen.req
        stream = gen.stream
        if tok in self._eog:
            gen.eos = True
            self._flush(gen)
            self.finish(gen, "stop")
            return
        stream.push(tok, self.model.piece(tok))
        lps = (logprob,) if logprob is not None else ()

        if req.banned_strings:
            hit = stream.banned_hit()
            if hit is not None:
                self._roll_back(gen, stream.roll_back(hit))
                return

        if req.stop:
            found = stream.find_stop()
            if found is not None:
                cut, which = found
                self._emit(gen, stream.cut_at(cut), (tok,), lps)
                self.finish(gen, "stop", stop_string=which)
                return
        if len(stream.tokens) >= req.max_tokens or len(gen.slot.cache) + 1 >= self.ctx.n_ctx:
            self._flush(gen, (tok,), lps)
            self.finish(gen, "length")
            return
        self.outbox.append((req, TokenEvent(stream.ready(), (tok,), lps)))  # as _emit
        gen.next_token = tok

    def _roll_back(self, gen: Generation, rollback: Rollback | None) -> None:
        """Act on a banned string: ban the token that began it at its position and sample
        that position again (KoboldCpp's phrase-ban backtracking), or, once the stream gave
        up rolling back (`None`), end the request where the string starts."""
        if rollback is None:
            self._flush(gen)
            self.finish(gen, "stop")
            return
        slot = gen.slot
        req = gen.req
        n_prompt = len(req.prompt)
        k = rollback.index
        gen.bans.setdefault(n_prompt + k, set()).add(rollback.token)
        keep_gen = gen.stream.tokens
        # Re-evaluate the token before the banned position so its logits are available again.
        keep = n_prompt + k - 1
        self.ctx.seq_rm(slot.id, keep, -1)
        del slot.cache[keep:]
        gen.next_token = (req.prompt + keep_gen)[keep]
        # Rebuild the sampler chain so its history matches the rolled-back sequence.
        gen.chain.free()
        gen.chain = SamplerChain(self.model, req.params, gen.seed, self.ctx.n_ctx)
        gen.chain.accept_prompt(req.prompt)
        for t in keep_gen:
            gen.chain.accept(t)

    def _emit(self, gen: Generation, text: str, tokens: tuple[int, ...], lps: tuple) -> None:
        """Send text the stream has handed out (and counted as sent) with its tokens."""
        if not text and not tokens:
            return
        self.outbox.append((gen.req, TokenEvent(text, tokens, lps)))

    def _flush(self, gen: Generation, tokens: tuple[int, ...] = (), lps: tuple = ()) -> None:
        self._emit(gen, gen.stream.flush(), tokens, lps)

    def finish(
        self,
        gen: Generation,
        reason: str,
        *,
        stop_string: str | None = None,
        error: str | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        """End a running request: free its slot, count it, send its FinishEvent (once)."""
        slot = gen.slot
        if slot.gen is not gen:
            return
        now = time.monotonic()
        t_first = gen.t_first or now
        timings = Timings(
            prompt_tokens=len(gen.req.prompt),
            cached_tokens=gen.n_cached,
            completion_tokens=len(gen.stream.tokens) + (1 if gen.eos else 0),
            prompt_ms=(t_first - gen.t_admit) * 1000,
            predicted_ms=(now - t_first) * 1000,
            queued_ms=(gen.t_admit - gen.t_submit) * 1000,
        )
        gen.chain.free()
        if self.stash.n_checkpoints and reason in ("stop", "length") and not gen.pending:
            # The next turn of this chat continues from here.
            self.stash.save_checkpoint(slot)
        slot.release(now)
        perf = self.perf
        perf.total_requests += 1
        perf.total_prompt_tokens += timings.prompt_tokens
        perf.total_cached_tokens += timings.cached_tokens
        perf.total_generated_tokens += timings.completion_tokens
        perf.last_prompt_seconds = timings.prompt_ms / 1000
        perf.last_eval_seconds = timings.predicted_ms / 1000
        perf.last_token_count = timings.completion_tokens
        perf.last_input_count = timings.prompt_tokens
        perf.last_seed = gen.seed
        perf.last_tokens_per_second = timings.predicted_per_second
        perf.last_stop_reason = {"length": 0, "stop": 2 if stop_string else 1}.get(reason, -1)
        if reason == "abort":
            perf.total_aborted += 1
        elif reason == "error":
            perf.total_errors += 1
        log.info(
            "request %d %s: %d prompt (%d reused), %d generated, %.0f ms prompt, %.1f tok/s",
            gen.req.id,
            reason,
            timings.prompt_tokens,
            timings.cached_tokens,
            timings.completion_tokens,
            timings.prompt_ms,
            timings.predicted_per_second,
        )
        self._finished(
            gen.req,
            FinishEvent(
                reason=reason,
                text=gen.stream.text,
                timings=timings,
                seed=gen.seed,
                stop_string=stop_string,
                error=error,
                eos=gen.eos,
                error_kind=kind,
                slot=slot.id,
            ),
        )

    def finish_unstarted(
        self,
        req: GenerationRequest,
        reason: str,
        error: str | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        """End a request that never got a slot (cancelled in the queue, or refused)."""
        timings = Timings(len(req.prompt), 0, 0, 0.0, 0.0, 0.0)
        if reason == "abort":
            self.perf.total_aborted += 1
        self._finished(
            req,
            FinishEvent(
                reason=reason, text="", timings=timings, seed=-1, error=error, error_kind=kind
            ),
        )

    def _finished(self, req: GenerationRequest, event: FinishEvent) -> None:
        self.outbox.append((req, event))
        self.urgent = True

"""The bridge between HTTP handlers (asyncio) and the engine thread.

Route modules call `Service.start()` with token ids and a normalised `Generation`; they get
a `RunningGeneration` whose events they await. Nothing here knows a route family's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from innkeeper.api.errors import ApiError
from innkeeper.api.params import Generation, ParamError
from innkeeper.engine.engine import Engine
from innkeeper.engine.events import (
    Event,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
)
from innkeeper.engine.sampling import GrammarError, check_grammar
from innkeeper.engine.scheduler import QueueFullError

log = logging.getLogger("innkeeper.api")

TIMEOUT_ERROR = "the request took longer than the server's --request-timeout"


@dataclass
class RunningGeneration:
    """One request in flight: its events arrive on an asyncio queue."""

    request: GenerationRequest
    queue: asyncio.Queue[Event]
    genkey: str | None = None
    created: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishEvent | None = None
    deadline: float | None = None  # time.monotonic() after which the request is cancelled
    timeout: float | None = None
    timed_out: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def cancel(self) -> None:
        self.request.cancel()

    async def events(self, ping_every: float | None = None) -> AsyncIterator[Event | None]:
        """Yield events until the finish event; None when `ping_every` passes with none.

        Past the deadline the generation is cancelled and its finish event becomes an
        error that names the timeout, so every route family reports it its own way.
        """
        while True:
            wait = ping_every or None
            if self.deadline is not None and not self.timed_out:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    log.info("request %d timed out: cancelling it", self.request.id)
                    self.timed_out = True
                    self.cancel()
                    continue
                wait = min(wait, left) if wait else left
            if wait:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), wait)
                except asyncio.TimeoutError:
                    if not self.timed_out and self.deadline and time.monotonic() >= self.deadline:
                        continue
                    yield None
                    continue
            else:
                ev = await self.queue.get()
            if isinstance(ev, TokenEvent):
                if ev.text:
                    self.parts.append(ev.text)
                if ev.logprobs:
                    self.logprobs.extend(ev.logprobs)
            else:
                if self.timed_out and ev.reason == "abort":
                    ev = dataclasses.replace(
                        ev, reason="error", error=f"{TIMEOUT_ERROR} ({self.timeout:g} s)"
                    )
                self.finish = ev
            yield ev
            if isinstance(ev, FinishEvent):
                return


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
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        self.request_timeout = request_timeout
        self.sse_ping_interval = sse_ping_interval
        self.last_text = ""
        self.running: dict[str, RunningGeneration] = {}
        self.started = time.time()

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: list[int]) -> str:
        """Token ids to text; ids outside the vocabulary are a ParamError, not a crash."""
        bad = [t for t in tokens if not self.engine.model.valid_token(t)]
        if bad:
            raise ParamError(f"token ids outside the vocabulary: {bad[:5]}")
        return self.engine.detokenize(tokens)

    def fit_prompt(self, prompt: list[int], gen: Generation) -> tuple[list[int], int]:
        """Check the prompt and length against the context; returns (prompt, max_tokens).

        With `truncation_length`/`max_context_length` the prompt is left-trimmed to fit, as
        text-generation-webui and KoboldCpp do; without, a prompt that leaves no room is a
        client error.
        """
        n_ctx = self.n_ctx
        if not prompt:
            bos = self.engine.model.bos
            if bos < 0:
                raise ParamError("the prompt is empty")
            prompt = [bos]
        if gen.max_tokens is not None and gen.max_tokens > n_ctx:
            raise ParamError(
                f"max_tokens ({gen.max_tokens}) exceeds the context size ({n_ctx} tokens)"
            )
        if gen.truncate_to:
            limit = min(gen.truncate_to, n_ctx)
            keep = limit - (gen.max_tokens or 0)
            if keep <= 0:
                raise ParamError(
                    f"max_tokens ({gen.max_tokens}) leaves no room for a prompt in a "
                    f"context of {limit} tokens"
                )
            if len(prompt) > keep:
                head = prompt[:1] if prompt[0] == self.engine.model.bos else []
                prompt = head + prompt[len(prompt) - keep + len(head) :]
        if len(prompt) >= n_ctx:
            raise ParamError(
                f"the prompt has {len(prompt)} tokens but the context holds {n_ctx}: "
                "no room to generate (shorten the prompt or start the server with a larger "
                "--ctx-size)"
            )
        room = n_ctx - len(prompt)
        max_tokens = min(gen.max_tokens, room) if gen.max_tokens else room
        return prompt, max_tokens

    def start(
        self,
        prompt: list[int],
        gen: Generation,
        *,
        default_max_tokens: int | None = None,
        n_logprobs: int = 0,
        genkey: str | None = None,
    ) -> RunningGeneration:
        if gen.max_tokens is None and default_max_tokens is not None:
            gen.max_tokens = default_max_tokens
        prompt, max_tokens = self.fit_prompt(prompt, gen)
        for tok in prompt:
            if not self.engine.model.valid_token(tok):
                raise ParamError(f"token id {tok} is outside the vocabulary")
        if gen.params.grammar:
            try:
                check_grammar(self.engine.model, gen.params.grammar)
            except GrammarError as exc:
                raise ParamError(str(exc)) from exc
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        req = GenerationRequest(
            prompt=prompt,
            params=gen.params,
            max_tokens=max_tokens,
            on_event=on_event,
            stop=gen.stop,
            banned_strings=gen.banned_strings,
            n_logprobs=max(n_logprobs, gen.n_probs),
            min_tokens=gen.min_tokens,
        )
        running = RunningGeneration(request=req, queue=queue, genkey=genkey)
        if self.request_timeout:
            running.timeout = self.request_timeout
            running.deadline = time.monotonic() + self.request_timeout
        try:
            self.engine.submit(req)
        except QueueFullError as exc:
            raise ApiError(
                503,
                f"the server is busy ({exc}); try again shortly",
                "service_unavailable",
                headers={"Retry-After": "2"},
            ) from exc
        self.running[running.id] = running
        return running

    def done(self, running: RunningGeneration) -> None:
        self.running.pop(running.id, None)

    def abort(self, genkey: str | None = None) -> int:
        """Stop running generations (all, or those started with `genkey`)."""
        n = 0
        for running in list(self.running.values()):
            if genkey and running.genkey != genkey:
                continue  # a keyed abort (KoboldCpp's multi-user rule) stops only its own run
            running.cancel()
            n += 1
        return n

    def latest(self, genkey: str | None = None) -> RunningGeneration | None:
        candidates = [r for r in self.running.values() if not genkey or r.genkey == genkey]
        return max(candidates, key=lambda r: r.created, default=None)

    async def collect(self, request: Request, running: RunningGeneration) -> FinishEvent:
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


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def check_finish(ev: FinishEvent) -> None:
    """An engine-side failure of one request becomes that request's error response."""
    if ev.reason == "error":
        if ev.error and ev.error.startswith(TIMEOUT_ERROR):
            raise ApiError(504, ev.error, "timeout_error")
        status = 400 if ev.error and "grammar" in ev.error else 500
        raise ApiError(status, ev.error or "generation failed", "server_error")

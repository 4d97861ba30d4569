"""One generation request as the runtime sees it: normalised, then running.

`Generation` is what every route family's body becomes (one `SamplingParams`, stop rules and
lengths, whatever aliases spelled them); `RunningGeneration` is a request handed to the engine,
whose events arrive on an asyncio queue. Neither knows HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from innkeeper.engine.events import (
    ErrorKind,
    Event,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
)
from innkeeper.engine.sampling import SamplingParams

log = logging.getLogger("innkeeper.serving")

TIMEOUT_ERROR = "the request took longer than the server's --request-timeout"


@dataclass
class Generation:
    """A normalised generation request, before tokenisation."""

    params: SamplingParams
    max_tokens: int | None  # None: until the context is full
    stop: list[str] = field(default_factory=list)
    banned_strings: list[str] = field(default_factory=list)
    truncate_to: int | None = None  # keep the prompt within this many tokens (left-trim)
    longest: tuple[str, int] | None = None  # the largest length asked, under any spelling
    min_tokens: int = 0
    n_probs: int = 0
    unsupported: list[str] = field(default_factory=list)


@dataclass
class RunningGeneration:
    """One request in flight: its events arrive on an asyncio queue."""

    request: GenerationRequest
    queue: asyncio.Queue[Event]
    genkey: str | None = None
    created: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    parts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated ids, as delivered
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
                self.tokens.extend(ev.tokens)
                if ev.text:
                    self.parts.append(ev.text)
                if ev.logprobs:
                    self.logprobs.extend(ev.logprobs)
            else:
                if self.timed_out and ev.reason == "abort":
                    ev = dataclasses.replace(
                        ev,
                        reason="error",
                        error=f"{TIMEOUT_ERROR} ({self.timeout:g} s)",
                        error_kind=ErrorKind.TIMEOUT,
                    )
                self.finish = ev
            yield ev
            if isinstance(ev, FinishEvent):
                return

"""One generation request as the runtime sees it: normalised, then running.

`Generation` is what every route family's body becomes (one `SamplingParams`, stop rules and
lengths, whatever aliases spelled them); `RunningGeneration` is a request handed to the engine,
whose events arrive in an `EventInbox`. Neither knows HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
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


class LoopWaker:
    """Wakes the readers of one event loop from the engine thread, one hand-off for many.

    The engine delivers a whole step's events at once (one per stream); they cost the loop
    one `call_soon_threadsafe` together, and none more while that one is still on its way.
    """

    __slots__ = ("_loop", "_pending", "_ready")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the wakers table maps each loop to its waker and must not keep loops alive.
        self._loop = weakref.ref(loop)
        self._ready: deque[EventInbox] = deque()
        self._pending = False

    def notify(self, inbox: EventInbox) -> None:
        """Engine thread. The append comes before the flag test: a wake-up still pending
        then runs after it and finds this inbox. Raises RuntimeError once the loop is
        closed (the engine then cancels the request)."""
        self._ready.append(inbox)
        if not self._pending:
            loop = self._loop()
            if loop is None:
                raise RuntimeError("the event loop of this request is gone")
            self._pending = True
            loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        self._pending = False
        ready = self._ready
        while ready:
            inbox = ready.popleft()
            listener = inbox._listener  # `wake` without its frame: once per token per stream
            if listener is not None:
                listener()
            else:
                inbox.wake()


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = (
    weakref.WeakKeyDictionary()
)


def waker_for(loop: asyncio.AbstractEventLoop) -> LoopWaker:
    """The one waker of `loop` (event-loop thread)."""
    waker = _wakers.get(loop)
    if waker is None:
        waker = _wakers[loop] = LoopWaker(loop)
    return waker


class EventInbox:
    """One request's events, put by the engine thread and read on the event loop.

    The reader waits on a bare future instead of `asyncio.wait_for` over `Queue.get` (a
    task, a timer and two futures per token); events that pile up while the loop is busy
    are taken together (`RunningGeneration.batches`).
    """

    __slots__ = ("_items", "_listener", "_loop", "_waiter", "_waker")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waker = waker_for(loop)
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._listener: Callable[[], None] | None = None

    def put(self, ev: Event) -> None:
        """Engine thread."""
        self._items.append(ev)
        self._waker.notify(self)

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Event-loop thread: call `listener` on each wake-up instead of resolving `wait`'s
        future, so one reader can watch several inboxes with one future of its own (None:
        back to `wait`)."""
        self._listener = listener

    def wake(self) -> None:
        """Event-loop thread: let a waiting reader look again."""
        listener = self._listener
        if listener is not None:
            listener()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def __bool__(self) -> bool:
        return bool(self._items)

    def take(self) -> Event:
        return self._items.popleft()

    async def wait(self, timeout: float | None) -> bool:
        """Until an event is there (True) or `timeout` seconds pass (False).

        A wake-up can come for events the reader already took (it drains everything each
        time): such a wake-up finds nothing and the wait goes on, it is no timeout.
        """
        loop = self._loop
        deadline = loop.time() + timeout if timeout else None
        while not self._items:
            waiter: asyncio.Future[bool] = loop.create_future()
            self._waiter = waiter
            timer = loop.call_at(deadline, _expire, waiter) if deadline is not None else None
            try:
                expired = await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if expired and not self._items:
                return False
        return True


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


@dataclass
class RunningGeneration:
    """One request in flight: its events arrive in an `EventInbox`."""

    request: GenerationRequest
    queue: EventInbox
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
        async for batch in self.batches(ping_every):
            if batch is None:
                yield None
                continue
            for ev in batch:
                yield ev

    async def batches(self, ping_every: float | None = None) -> AsyncIterator[list[Event] | None]:
        """As `events`, but every event already waiting comes in one list (never empty),
        so a stream can write the tokens that piled up while it was busy in one go."""
        inbox = self.queue
        while True:
            if not inbox:
                wait = ping_every or None
                if self.deadline is not None and not self.timed_out:
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        self.expire()
                        continue
                    wait = min(wait, left) if wait else left
                if not await inbox.wait(wait):
                    if not self.timed_out and self.deadline and time.monotonic() >= self.deadline:
                        continue
                    yield None
                    continue
            batch = self.waiting()
            yield batch
            if self.finish is not None:
                return

    def waiting(self) -> list[Event]:
        """Event-loop thread: every event delivered so far, recorded and in order, up to the
        finish event (nothing follows it). Once per token per stream: kept to plain loops."""
        items = self.queue._items
        batch: list[Event] = []
        if self.finish is not None:
            return batch
        while items:
            ev = items.popleft()
            if type(ev) is TokenEvent:
                self.tokens.extend(ev.tokens)
                if ev.text:
                    self.parts.append(ev.text)
                if ev.logprobs:
                    self.logprobs.extend(ev.logprobs)
                batch.append(ev)
            else:
                batch.append(self._note(ev))
                if self.finish is not None:
                    break
        return batch

    def expire(self) -> None:
        """Cancel a run past its deadline; its finish event will name the timeout."""
        if self.timed_out or self.finish is not None:
            return
        log.info("request %d timed out: cancelling it", self.request.id)
        self.timed_out = True
        self.cancel()

    def _note(self, ev: Event) -> Event:
        """Record a delivered event (text, tokens, the finish) and return it as delivered."""
        if isinstance(ev, TokenEvent):
            self.tokens.extend(ev.tokens)
            if ev.text:
                self.parts.append(ev.text)
            if ev.logprobs:
                self.logprobs.extend(ev.logprobs)
            return ev
        if self.timed_out and ev.reason == "abort":
            ev = dataclasses.replace(
                ev,
                reason="error",
                error=f"{TIMEOUT_ERROR} ({self.timeout:g} s)",
                error_kind=ErrorKind.TIMEOUT,
            )
        self.finish = ev
        return ev

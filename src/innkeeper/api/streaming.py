"""Streamed answers: server-sent events (framing, keep-alive pings) and Ollama's NDJSON, with
cancellation when the client leaves.

Every streamed token costs the event loop a wake-up, its framing and a socket write, while
llama.cpp's threads want the same cores. So a stream is one small task of its own that
frames what its runs delivered straight into the server's `send` (`SERVER_SEND`: body
messages skip the middlewares, which all look at `http.response.start` only), and routes
frame tokens with `ChunkTemplate`s encoded once per request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from json.encoder import encode_basestring
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from innkeeper.engine.events import Event, FinishEvent
from innkeeper.serving.generation import RunningGeneration
from innkeeper.serving.service import Service

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
SSE_TYPE = "text/event-stream"
NDJSON_TYPE = "application/x-ndjson"
# The ASGI server's own `send`, put in the scope by the app (app.py): stream bodies go there.
SERVER_SEND = "innkeeper.server_send"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# One encoder for every chunk: json.dumps with any non-default option builds a new
# JSONEncoder per call, once per token here.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# A JSON string exactly as `_ENCODER` writes one (the same C function), quotes included.
json_str: Callable[[str], str] = encode_basestring


def dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {dumps(data)}\n\n".encode()


def ndjson_line(obj: Any) -> bytes:
    return (dumps(obj) + "\n").encode()


def slot(n: int) -> str:
    """Marks where a `ChunkTemplate` leaves the `n`th value open."""
    return f"\x00slot{n}\x00"


class ChunkTemplate:
    """One chunk shape whose fields are fixed for the request but a few: encoded once, then
    each token costs the JSON of those few values and one concatenation (no dict, no
    encoder), byte for byte what `sse`/`ndjson_line` make of the whole object."""

    __slots__ = ("_parts",)

    def __init__(self, obj: Any, *, before: str = "data: ", after: str = "\n\n") -> None:
        text = before + dumps(obj) + after
        parts: list[str] = []
        n = 0
        while True:
            head, found, text = text.partition(dumps(slot(n)))
            parts.append(head)
            if not found:
                break
            n += 1
        if n == 0 or any(dumps(slot(i)) in p for i, p in enumerate(parts, 1)):
            raise ValueError("a chunk template needs slots 0..n-1, each once, in order")
        self._parts = parts

    def __call__(self, *values: str) -> bytes:
        """The chunk with each slot replaced by its value's JSON (`json_str` for text)."""
        p = self._parts
        if len(values) == 1:
            return (p[0] + values[0] + p[1]).encode()
        out = [p[0]]
        for value, literal in zip(values, p[1:], strict=True):
            out += (value, literal)
        return "".join(out).encode()


Frame = Callable[[int, Event], bytes]
# A single run's frame: no index (and no wrapper's call per token to drop one).
OneFrame = Callable[[Event], bytes]


def eager(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` at once up to its first suspension, as Python 3.12's eager tasks do: None
    when it finished there (a write the transport took), else the task that carries it on."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_carry_on(coro, yielded))


async def _carry_on(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Go on with a coroutine suspended on `yielded` (a future, or None: a bare yield)."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                await yielded
        except BaseException as exc:  # cancelled, or the future's error: the coroutine's
            send = functools.partial(coro.throw, exc)
        else:
            send = functools.partial(coro.send, None)
        try:
            yielded = send()
        except StopIteration:
            return


class EventStream(Response):
    """The events of one or more runs as one streamed body, framed by `frame(index, event)`
    (`frame(event)` when not `indexed`; b"": nothing to send); a closed connection cancels
    every run still going, and every run is forgotten by the service however the stream ends.

    No task per token: the runs' inboxes call `_pump` on the loop when events come, which
    frames them and writes them at once (`eager`); only a write the client is slow to take
    becomes a task, and events that come meanwhile wait in the inboxes. With `coalesce`
    (SSE) the chunks of every event already waiting go out as one body message, so a slow
    reader gets several tokens per write; without (NDJSON), each chunk is its own message.
    `head` goes out first, `end()` once every run has finished (OpenAI's usage chunk), then
    `tail`. `ping` goes out after `ping_every` seconds without a write (proxies cut silent
    streams, e.g. during a long prompt)."""

    def __init__(
        self,
        service: Service,
        runs: list[RunningGeneration],
        frame: Frame | OneFrame,
        *,
        indexed: bool = True,
        media_type: str,
        coalesce: bool,
        head: Iterable[bytes] = (),
        end: Callable[[], Iterable[bytes]] | None = None,
        tail: bytes | None = None,
        ping: bytes | None = None,
        ping_every: float | None = None,
    ) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(STREAM_HEADERS)
        self.service = service
        self.runs = runs
        self.frame: Callable[..., bytes] = frame
        self.indexed = indexed
        self.coalesce = coalesce
        self.end = end
        self.tail = tail
        self.ping = ping if ping_every else None
        self.ping_every = ping_every or 0.0
        self._left = len(runs)  # runs not finished yet
        self._outbox: deque[bytes | None] = deque(head)  # None: the body's end
        self._blocked: asyncio.Task[None] | None = None  # a write waiting on the client
        self._ping_timer: asyncio.TimerHandle | None = None
        self._last_write = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        timers = [
            loop.call_later(run.deadline - time.monotonic(), run.expire)
            for run in self.runs
            if run.deadline is not None
        ]
        watcher: asyncio.Task[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            self._send = scope.get(SERVER_SEND, send)
            watcher = loop.create_task(_wait_disconnect(receive))
            for run in self.runs:
                run.queue.listen(self._pump)
            self._last_write = loop.time()
            self._pump()
            await asyncio.wait((self._done, watcher), return_when=asyncio.FIRST_COMPLETED)
            if self._done.done():
                self._done.result()  # the writer's errors are the response's
        finally:
            if not self._done.done():
                self._done.cancel()  # nothing more gets written
            for handle in (*timers, self._ping_timer, self._blocked, watcher):
                if handle is not None:
                    handle.cancel()
            for running in self.runs:
                running.queue.listen(None)
                if running.finish is None:
                    running.cancel()
                self.service.done(running)

    def _pump(self) -> None:
        """Loop thread (inbox wake-ups, the ping timer, a slow write's end): frame what
        came and write it, unless a write still waits on the client."""
        if self._blocked is not None or self._done.done():
            return
        try:
            outbox = self._outbox
            if self._left:
                self._collect(outbox)
            if outbox and self.ping is not None:
                self._last_write = self._loop.time()
            while outbox:
                chunk = outbox.popleft()
                if chunk is None:
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                else:
                    message = {"type": "http.response.body", "body": chunk, "more_body": True}
                blocked = eager(self._send(message))
                if blocked is not None:
                    self._blocked = blocked
                    blocked.add_done_callback(self._unblocked)
                    return
            if not self._left:
                self._done.set_result(None)
            elif self.ping is not None and self._ping_timer is None:
                self._ping_timer = self._loop.call_at(
                    self._last_write + self.ping_every, self._tick
                )
        except Exception as exc:
            self._done.set_exception(exc)

    def _collect(self, outbox: deque[bytes | None]) -> None:
        """Frame every event the runs delivered; after the last finish, the body's end."""
        frame = self.frame
        indexed = self.indexed
        out: list[bytes] = []
        for index, run in enumerate(self.runs):
            for ev in run.waiting():
                if type(ev) is FinishEvent:
                    self._left -= 1
                chunk = frame(index, ev) if indexed else frame(ev)
                if chunk:
                    out.append(chunk)
        if self.coalesce and len(out) > 1:
            out = [b"".join(out)]
        outbox.extend(out)
        if not self._left:
            if self.end is not None:
                outbox.extend(self.end())
            if self.tail:
                outbox.append(self.tail)
            outbox.append(None)

    def _unblocked(self, task: asyncio.Task[None]) -> None:
        self._blocked = None
        if task.cancelled() or self._done.done():
            return
        exc = task.exception()
        if exc is not None:
            self._done.set_exception(exc)
            return
        self._pump()

    def _tick(self) -> None:
        """Ping timer: a ping once `ping_every` passed without a write, else wait on."""
        self._ping_timer = None
        if self._done.done():
            return
        if self._blocked is None and self._loop.time() - self._last_write >= self.ping_every:
            assert self.ping is not None
            self._outbox.append(self.ping)
        self._pump()


async def _wait_disconnect(receive: Receive) -> None:
    """Returns once the client is gone (the body was read before the stream began)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def sse_response(
    service: Service,
    running: RunningGeneration,
    frame: OneFrame,
    *,
    tail: bytes | None = DONE,
    ping_every: float | None = None,
) -> Response:
    """Stream `running`'s events framed by `frame`; a closed connection cancels it.

    Keep-alive comments go out every `ping_every` seconds (default: the server's
    --sse-ping-interval) while no token comes, e.g. during a long prompt, so proxies do not
    cut the stream.
    """
    return sse_runs_response(
        service, [running], frame, indexed=False, tail=tail, ping_every=ping_every
    )


def ndjson_response(service: Service, running: RunningGeneration, frame: OneFrame) -> Response:
    """Ollama's stream: one JSON object per line, each line its own `http.response.body`
    message (one HTTP chunk), never joined with the next. SillyTavern's Ollama reader parses
    everything received so far as one JSON value, so two lines in one chunk break it. NDJSON
    has no comment line, so no keep-alive pings either."""
    return EventStream(
        service,
        [running],
        frame,
        indexed=False,
        media_type=NDJSON_TYPE,
        coalesce=False,
    )


def sse_runs_response(
    service: Service,
    runs: list[RunningGeneration],
    frame: Frame | OneFrame,
    *,
    indexed: bool = True,
    head: Iterable[bytes] = (),
    end: Callable[[], Iterable[bytes]] | None = None,
    tail: bytes | None = DONE,
    ping_every: float | None = None,
) -> Response:
    """Several runs on one stream (OpenAI's `n` and prompt lists), each run's events framed
    with its index as they arrive, interleaved; see `EventStream`."""
    if ping_every is None:
        ping_every = service.sse_ping_interval
    return EventStream(
        service,
        runs,
        frame,
        indexed=indexed,
        media_type=SSE_TYPE,
        coalesce=True,
        head=head,
        end=end,
        tail=tail,
        ping=PING,
        ping_every=ping_every,
    )

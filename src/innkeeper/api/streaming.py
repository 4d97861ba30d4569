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
import json
import time
from collections.abc import Callable, Iterable
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


class EventStream(Response):
    """The events of one or more runs as one streamed body, framed by `frame(index, event)`
    (b"": nothing to send); a closed connection cancels every run still going, and every
    run is forgotten by the service however the stream ends.

    A writer task of its own (a short chain to resume per token, not the request's whole
    middleware stack) waits on one future that any run's inbox resolves. With `coalesce`
    (SSE) the chunks of every event already waiting go out as one body message, so a client
    that reads slower than the model writes gets several tokens per write; without (NDJSON),
    each chunk is its own message. `head` goes out first, `end()` once every run has finished
    (OpenAI's usage chunk), then `tail`. `ping` goes out after `ping_every` seconds without
    a write (proxies cut silent streams, e.g. during a long prompt)."""

    def __init__(
        self,
        service: Service,
        runs: list[RunningGeneration],
        frame: Frame,
        *,
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
        self.frame = frame
        self.coalesce = coalesce
        self.head = list(head)
        self.end = end
        self.tail = tail
        self.ping = ping if ping_every else None
        self.ping_every = ping_every or 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._last_write = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            tasks = [
                loop.create_task(self._write(scope.get(SERVER_SEND, send))),
                loop.create_task(_wait_disconnect(receive)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the writer's errors are the response's
        finally:
            for task in tasks:
                task.cancel()
            for running in self.runs:
                running.queue.listen(None)
                if running.finish is None:
                    running.cancel()
                self.service.done(running)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _tick(self) -> None:
        """Ping timer: wakes the writer once `ping_every` passed since the last write."""
        self._ping_timer = None
        self._wake()

    async def _write(self, send: Send) -> None:
        loop = self._loop = asyncio.get_running_loop()
        runs, frame, coalesce = self.runs, self.frame, self.coalesce
        self._last_write = loop.time()
        timers = [
            loop.call_later(run.deadline - time.monotonic(), run.expire)
            for run in runs
            if run.deadline is not None
        ]
        self._ping_timer: asyncio.TimerHandle | None = None
        for run in runs:
            run.queue.listen(self._wake)
        try:
            if self.head:
                await self._send(send, self.head)
            left = len(runs)
            while left:
                out: list[bytes] = []
                for index, run in enumerate(runs):
                    if run.queue:
                        for ev in run.waiting():
                            if type(ev) is FinishEvent:
                                left -= 1
                            chunk = frame(index, ev)
                            if chunk:
                                out.append(chunk)
                if out:
                    if coalesce and len(out) > 1:
                        out = [b"".join(out)]
                    await self._send(send, out)
                    continue  # more may have come while the write waited on the client
                if not left:
                    break
                if self.ping is not None and loop.time() - self._last_write >= self.ping_every:
                    await self._send(send, [self.ping])
                    continue
                await self._wait(loop)
            tail = list(self.end()) if self.end is not None else []
            if self.tail:
                tail.append(self.tail)
            if tail:
                await self._send(send, tail)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            for timer in timers:
                timer.cancel()
            if self._ping_timer is not None:
                self._ping_timer.cancel()

    async def _send(self, send: Send, chunks: list[bytes]) -> None:
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.ping is not None:
            self._last_write = self._loop.time()

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Until a run's inbox wakes the writer, or it is time for a ping."""
        if self.ping is not None and self._ping_timer is None:
            self._ping_timer = loop.call_at(self._last_write + self.ping_every, self._tick)
        # No await since the writer last looked at the inboxes: whatever the engine put
        # since then has its wake-up still to come on this loop, and finds this future.
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


async def _wait_disconnect(receive: Receive) -> None:
    """Returns once the client is gone (the body was read before the stream began)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def sse_response(
    service: Service,
    running: RunningGeneration,
    frame: Callable[[Event], bytes],
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
        service, [running], lambda _i, ev: frame(ev), tail=tail, ping_every=ping_every
    )


def ndjson_response(
    service: Service, running: RunningGeneration, frame: Callable[[Event], bytes]
) -> Response:
    """Ollama's stream: one JSON object per line, each line its own `http.response.body`
    message (one HTTP chunk), never joined with the next. SillyTavern's Ollama reader parses
    everything received so far as one JSON value, so two lines in one chunk break it. NDJSON
    has no comment line, so no keep-alive pings either."""
    return EventStream(
        service,
        [running],
        lambda _i, ev: frame(ev),
        media_type=NDJSON_TYPE,
        coalesce=False,
    )


def sse_runs_response(
    service: Service,
    runs: list[RunningGeneration],
    frame: Frame,
    *,
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
        media_type=SSE_TYPE,
        coalesce=True,
        head=head,
        end=end,
        tail=tail,
        ping=PING,
        ping_every=ping_every,
    )

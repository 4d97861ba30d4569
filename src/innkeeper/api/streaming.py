"""Streamed answers: server-sent events (framing, keep-alive pings) and Ollama's NDJSON, with
cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from innkeeper.engine.events import Event, FinishEvent
from innkeeper.serving.generation import RunningGeneration
from innkeeper.serving.service import Service

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
SSE_TYPE = "text/event-stream"
NDJSON_TYPE = "application/x-ndjson"


# One encoder for every chunk: json.dumps with any non-default option builds a new
# JSONEncoder per call, once per token here.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {dumps(data)}\n\n".encode()


class _RunsResponse(StreamingResponse):
    """A stream that releases its runs however it ends: a client that is gone before the
    body generator first runs never reaches the generator's `finally`."""

    def __init__(
        self, runs: list[RunningGeneration], service: Service, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.runs = runs
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for running in self.runs:
                if running.finish is None:
                    running.cancel()
                self.service.done(running)


def sse_response(
    service: Service,
    running: RunningGeneration,
    frame: Callable[[Event], Iterable[bytes]],
    *,
    tail: bytes | None = DONE,
    ping_every: float | None = None,
) -> StreamingResponse:
    """Stream `running`'s events framed by `frame`; a closed connection cancels it.

    Starlette cancels this generator when the client disconnects; the `finally` turns that
    into an engine cancel, which frees the slot before the next decode step. Keep-alive
    comments go out every `ping_every` seconds (default: the server's --sse-ping-interval)
    while no token comes, e.g. during a long prompt, so proxies do not cut the stream.
    """
    if ping_every is None:
        ping_every = service.sse_ping_interval
    return _run_stream(
        service,
        running,
        frame,
        tail=tail,
        ping=PING,
        ping_every=ping_every,
        media_type=SSE_TYPE,
        coalesce=True,
    )


def ndjson_line(obj: Any) -> bytes:
    return (dumps(obj) + "\n").encode()


def ndjson_response(
    service: Service, running: RunningGeneration, frame: Callable[[Event], Iterable[Any]]
) -> StreamingResponse:
    """Ollama's stream: one JSON object per line, each line its own `http.response.body`
    message (one HTTP chunk), never joined with the next. SillyTavern's Ollama reader parses
    everything received so far as one JSON value, so two lines in one chunk break it. NDJSON
    has no comment line, so no keep-alive pings either."""
    return _run_stream(
        service,
        running,
        lambda ev: [ndjson_line(obj) for obj in frame(ev)],
        tail=None,
        ping=None,
        ping_every=None,
        media_type=NDJSON_TYPE,
        coalesce=False,
    )


def _run_stream(
    service: Service,
    running: RunningGeneration,
    frame: Callable[[Event], Iterable[bytes]],
    *,
    tail: bytes | None,
    ping: bytes | None,
    ping_every: float | None,
    media_type: str,
    coalesce: bool,
    head: Iterable[bytes] = (),
    end: Callable[[], Iterable[bytes]] | None = None,
) -> StreamingResponse:
    """One run's events as a stream. With `coalesce` (SSE), the chunks of every event that
    was already waiting go out as one body message; without (NDJSON), each chunk `frame`
    makes is its own body message."""

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in head:
                yield chunk
            async for batch in running.batches(ping_every):
                if batch is None:
                    if ping:
                        yield ping
                    continue
                if coalesce:
                    joined = b"".join([chunk for ev in batch for chunk in frame(ev)])
                    if joined:
                        yield joined
                    continue
                for ev in batch:
                    for chunk in frame(ev):
                        yield chunk
            if end is not None:
                for chunk in end():
                    yield chunk
            if tail:
                yield tail
        finally:
            if running.finish is None:
                running.cancel()
            service.done(running)

    return _RunsResponse(
        [running],
        service,
        body(),
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def sse_runs_response(
    service: Service,
    runs: list[RunningGeneration],
    frame: Callable[[int, Event], Iterable[bytes]],
    *,
    head: Iterable[bytes] = (),
    end: Callable[[], Iterable[bytes]] | None = None,
    tail: bytes | None = DONE,
    ping_every: float | None = None,
) -> StreamingResponse:
    """Several runs on one stream (OpenAI's `n` and prompt lists), as `sse_response` does one.

    Each run's events are framed with its index as they arrive, interleaved; `head` goes
    out first, `end()` after every run has finished (the usage chunk), then `tail`. A closed
    connection cancels every run still going, and every run is forgotten by the service.
    """
    if ping_every is None:
        ping_every = service.sse_ping_interval
    if len(runs) == 1:
        # One run needs no merging: frame its batches as they come (no pump task, no
        # second queue between the engine and the socket).
        only = runs[0]
        return _run_stream(
            service,
            only,
            lambda ev: frame(0, ev),
            tail=tail,
            ping=PING,
            ping_every=ping_every,
            media_type=SSE_TYPE,
            coalesce=True,
            head=head,
            end=end,
        )

    async def body() -> AsyncIterator[bytes]:
        merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def pump(index: int, running: RunningGeneration) -> None:
            async for ev in running.events():
                if ev is not None:
                    merged.put_nowait((index, ev))

        pumps = [asyncio.create_task(pump(i, r)) for i, r in enumerate(runs)]
        try:
            for chunk in head:
                yield chunk
            left = len(runs)
            while left:
                try:
                    index, ev = await asyncio.wait_for(merged.get(), ping_every or None)
                except asyncio.TimeoutError:
                    yield PING
                    continue
                out: list[bytes] = []
                while True:
                    if isinstance(ev, FinishEvent):
                        left -= 1
                    out.extend(frame(index, ev))
                    if merged.empty():
                        break
                    index, ev = merged.get_nowait()
                if out:
                    yield b"".join(out)
            if end is not None:
                for chunk in end():
                    yield chunk
            if tail:
                yield tail
        finally:
            for running in runs:
                if running.finish is None:
                    running.cancel()
            for task in pumps:
                task.cancel()
            for running in runs:
                service.done(running)

    return _RunsResponse(
        runs,
        service,
        body(),
        media_type=SSE_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

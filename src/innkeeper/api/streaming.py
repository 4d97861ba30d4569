"""Server-sent events: framing, keep-alive pings, and cancellation when the client leaves."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from starlette.responses import StreamingResponse

from innkeeper.api.service import RunningGeneration, Service
from innkeeper.engine.events import Event

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {dumps(data)}\n\n".encode()


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

    async def body() -> AsyncIterator[bytes]:
        try:
            async for ev in running.events(ping_every):
                if ev is None:
                    yield PING
                    continue
                for chunk in frame(ev):
                    yield chunk
            if tail:
                yield tail
        finally:
            if running.finish is None:
                running.cancel()
            service.done(running)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

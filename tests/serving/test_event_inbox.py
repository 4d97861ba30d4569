"""EventInbox and LoopWaker: engine-thread events reach the loop complete, in order, batched.

A lost wake-up would hang a stream, a duplicated or reordered event would corrupt it; the
engine thread here is a plain thread putting events as fast as it can while the loop reads.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from innkeeper.engine.events import FinishEvent, GenerationRequest, Timings, TokenEvent
from innkeeper.engine.sampling import SamplingParams
from innkeeper.serving.generation import EventInbox, RunningGeneration

N = 3000


def _finish() -> FinishEvent:
    return FinishEvent("stop", "", Timings(1, 0, N, 0.0, 0.0, 0.0), seed=1)


async def _read_all(bursty: bool) -> tuple[list[int], int]:
    inbox = EventInbox(asyncio.get_running_loop())
    req = GenerationRequest([1], SamplingParams(), N, inbox.put)
    running = RunningGeneration(request=req, queue=inbox)

    def engine() -> None:
        for i in range(N):
            inbox.put(TokenEvent(text="x", tokens=(i,)))
            if bursty and i % 100 == 0:
                threading.Event().wait(0.001)  # let the reader catch up and wait again
        inbox.put(_finish())

    thread = threading.Thread(target=engine)
    thread.start()
    batches = 0
    async for batch in running.batches(ping_every=5.0):
        assert batch, "a batch is never empty, and no ping comes while events flow"
        batches += 1
    thread.join()
    assert running.finish is not None and running.text == "x" * N
    return running.tokens, batches


@pytest.mark.parametrize("bursty", [False, True])
def test_every_event_arrives_once_in_order(bursty: bool) -> None:
    tokens, batches = asyncio.run(_read_all(bursty))
    assert tokens == list(range(N))
    assert batches < N  # events that piled up came together


def test_a_closed_loop_refuses_events() -> None:
    """The engine cancels a request whose consumer raises: a closed loop must raise."""
    loop = asyncio.new_event_loop()
    inbox = EventInbox(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        inbox.put(TokenEvent(text="x", tokens=(1,)))


def test_a_quiet_stream_yields_pings() -> None:
    async def main() -> object:
        inbox = EventInbox(asyncio.get_running_loop())
        req = GenerationRequest([1], SamplingParams(), 1, inbox.put)
        running = RunningGeneration(request=req, queue=inbox)
        async for batch in running.batches(ping_every=0.01):
            return batch
        return "ended"

    assert asyncio.run(main()) is None

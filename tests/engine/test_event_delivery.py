"""When a step's events reach their consumers: before the next decode, all together.

The engine keeps a step's events until just before the next `llama_decode` (so consumers run
while the model does, not against the engine thread's batch building), and hands them over
at once when no decode follows (a request finished). Holding them any longer would make every
stream lag a step: checked here against the decode calls themselves.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from innkeeper.engine.engine import Engine
from innkeeper.engine.events import FinishEvent, TokenEvent
from tests.engine.conftest import Runner, flush


def _record_decodes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, seen: list[list[Any]]
) -> list[tuple[int, ...]]:
    """Wrap ctx.decode: before each call, note how many events each consumer has."""
    counts: list[tuple[int, ...]] = []
    inner = engine.ctx.decode

    def decode(batch: Any) -> int:
        counts.append(tuple(len(events) for events in seen))
        return inner(batch)

    monkeypatch.setattr(engine.ctx, "decode", decode)
    return counts


def test_each_token_is_delivered_before_the_next_decode(
    runner: Runner, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    flush(engine)
    prompt = engine.tokenize("The quick brown fox jumps over the lazy dog. The")
    seen: list[list[Any]] = []
    counts = _record_decodes(engine, monkeypatch, seen)
    _, done, events = runner.submit(prompt, max_tokens=6, ignore_eos=True)
    seen.append(events)
    assert done.wait(120)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert isinstance(events[-1], FinishEvent) and len(tokens) == 6
    # Decode 1 is the prompt; before decode k+1, the k tokens sampled so far were delivered.
    # The 6th token needs no decode: it (and the finish) went out without waiting for one.
    assert [c[0] for c in counts] == [0, 1, 2, 3, 4, 5]


def test_concurrent_streams_get_their_step_events_together(
    runner: Runner, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    flush(engine)
    prompt = engine.tokenize("Once upon a time")
    seen: list[list[Any]] = []
    gate = threading.Event()
    counts = _record_decodes(engine, monkeypatch, seen)
    runs = []
    # Hold the engine thread until both requests are queued, so they start in one step.
    engine.scheduler.call(gate.wait)
    for _ in range(2):
        _, done, events = runner.submit(prompt, max_tokens=5, ignore_eos=True)
        seen.append(events)
        runs.append(done)
    gate.set()
    assert all(done.wait(120) for done in runs)
    for a, b in counts:
        assert a == b  # every decode saw both streams equally served
    assert counts[-1] == (4, 4)

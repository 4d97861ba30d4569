"""An in-process engine on the real embedded model, for scheduler tests below the HTTP layer."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from innkeeper.engine.engine import Engine, EngineConfig
from innkeeper.engine.events import FinishEvent, GenerationRequest, TokenEvent
from innkeeper.engine.sampling import SamplingParams
from innkeeper.models.store import default_model_path


class Runner:
    """Submit requests to an engine and wait for their results."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(
        self, prompt: list[int], max_tokens: int = 24, n_logprobs: int = 0, **params
    ) -> tuple[GenerationRequest, threading.Event, list]:
        events: list = []
        done = threading.Event()

        def on_event(ev) -> None:
            events.append(ev)
            if isinstance(ev, FinishEvent):
                done.set()

        sp = SamplingParams(**{"temperature": 0.0, **params})
        req = GenerationRequest(
            prompt=prompt,
            params=sp,
            max_tokens=max_tokens,
            on_event=on_event,
            n_logprobs=n_logprobs,
        )
        self.engine.submit(req)
        return req, done, events

    def run(
        self, prompt: list[int], max_tokens: int = 24, **kw
    ) -> tuple[str, FinishEvent, list[TokenEvent]]:
        _, done, events = self.submit(prompt, max_tokens, **kw)
        assert done.wait(120), "generation did not finish"
        fin = events[-1]
        return fin.text, fin, [e for e in events if isinstance(e, TokenEvent)]


def flush(engine: Engine) -> None:
    """Forget every slot's cache and every parked conversation, so a test starts cold."""
    sched = engine.scheduler
    for slot in sched.slots:
        slot.forget(engine.ctx)
    sched.stash.parked.clear()


def make_engine(**kw) -> Engine:
    cfg = {"model_path": default_model_path(), "ctx_size": 4096, "threads": 1, "parallel": 4, **kw}
    return Engine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = make_engine()
    yield e
    e.close()


@pytest.fixture(scope="module")
def cold_engine() -> Iterator[Engine]:
    """A second engine whose caches the tests never warm, for cold reference outputs."""
    e = make_engine(parallel=1, cache_reuse=0)
    yield e
    e.close()


@pytest.fixture()
def runner(engine: Engine) -> Runner:
    return Runner(engine)


@pytest.fixture()
def cold(cold_engine: Engine) -> Runner:
    return Runner(cold_engine)

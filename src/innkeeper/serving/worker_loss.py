"""An RPC worker that dies while models run on it: those models end, the server goes on.

engine/rpc.py finds the worker gone (inside ggml's abort hook) and tells the listener
registered here. On the server's event loop, every loaded model that uses it is then
stranded: its requests end at once with an error naming the worker (streams with their
API's error event, other requests with a 502), its entry becomes FAILED with that reason,
and its objects are parked in `_stranded` for the life of the process. They cannot be freed:
the engine thread waits inside llama.cpp forever and every buffer free would wait on the dead
connection. So the memory it held here (and on the workers still alive) stays in use until
the server restarts, and the memory plan keeps counting it. Other models keep serving; the
next load of the model reaches the restarted worker afresh.

A load across workers runs on a thread of its own (`WorkerLossWatch.build`). A worker lost
while it uploads the weights leaves that thread waiting inside llama.cpp for good: the load
fails at once with WorkerLost naming the worker, and the thread, with the half-loaded model,
is kept in `_stranded` like a stranded model (its planned share here counted as held). The
registry's lock and its load pool are free for the next load, which a thread stuck for good
could not give back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from innkeeper.engine import rpc
from innkeeper.models.memory import MemoryPlan
from innkeeper.serving.catalog import ModelState
from innkeeper.serving.errors import WorkerLost

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Executor

    from innkeeper.serving.registry import ModelRegistry
    from innkeeper.serving.service import Service

T = TypeVar("T")
log = logging.getLogger("innkeeper.registry")


@dataclass(frozen=True)
class Stranded:
    """A model whose worker died: kept referenced for good (never freed, never collected)."""

    model_id: str
    service: Service | None  # None: a load the worker died in
    plan: MemoryPlan | None
    workers: tuple[str, ...]  # the lost ones
    reason: str
    since: float  # time.time()
    stuck: threading.Thread | None = None  # the abandoned load's thread (its frames hold the
    # half-loaded model): it waits inside llama.cpp for good

    def held_plan(self) -> MemoryPlan | None:
        """The memory it still holds: its plan, less the devices of the lost workers (whose
        process died and gave it back)."""
        if self.plan is None:
            return None
        kept = tuple(d for d in self.plan.devices if d.endpoint not in self.workers)
        return replace(self.plan, devices=kept)


_stranded: list[Stranded] = []  # module-level: nothing may ever free these


def held_plans() -> list[MemoryPlan]:
    """What stranded models still hold, for the fit of every later load."""
    return [p for s in _stranded if (p := s.held_plan()) is not None]


def lost_workers_json() -> list[dict[str, Any]]:
    """The workers gone since a load last used them (/health, the status)."""
    return [
        {"endpoint": endpoint, "since": round(since, 3)}
        for endpoint, since in sorted(rpc.lost_workers().items())
    ]


def stranded_json() -> list[dict[str, Any]]:
    """The models stranded by a lost worker, and what they still hold (the status)."""
    out = []
    for s in _stranded:
        plan = s.held_plan()
        out.append(
            {
                "id": s.model_id,
                "while": "loaded" if s.service is not None else "loading",
                "workers": list(s.workers),
                "reason": s.reason,
                "since": round(s.since, 3),
                "memory_held_bytes": sum(d.total_bytes for d in plan.devices) if plan else None,
                "note": "its memory stays in use until the server restarts",
            }
        )
    return out


class WorkerLossWatch:
    """The registry's listener for lost RPC workers, while the server's event loop runs."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._loop: asyncio.AbstractEventLoop | None = None
        self._remove: Callable[[], None] | None = None
        # the loads across workers in flight: the future `strand` settles -> their workers
        self._loads: dict[asyncio.Future[tuple[tuple[str, ...], str]], tuple[str, ...]] = {}

    def start(self) -> None:
        """Listen (on the server's event loop: the news is handled there)."""
        if self._remove is None:
            self._loop = asyncio.get_running_loop()
            self._remove = rpc.on_worker_lost(self._heard)

    def stop(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def _heard(self, endpoints: tuple[str, ...], why: str) -> None:
        """ggml's thread: hand the news to the event loop (which owns the registry)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.strand, endpoints, why)

    def strand(self, endpoints: tuple[str, ...], why: str) -> None:
        """End every loaded model on a lost worker, and every load across it (event loop)."""
        lost = set(endpoints)
        for gone, workers in self._loads.items():
            hit = tuple(w for w in workers if w in lost)
            if hit and not gone.done():
                gone.set_result((hit, why))
        for e in list(self.registry.entries_by_id.values()):
            service = e.service
            workers = tuple(w for w in service.engine.config.rpc if w in lost) if service else ()
            if service is None or not workers:
                continue
            reason = (
                f"{why}: model {e.id} cannot run without it; restart the worker, then load "
                "the model again (the memory it held here stays in use until the server "
                "restarts)"
            )
            _wreck(e.id, service, e.loaded_plan, workers, reason)
            e.service, e.loaded_plan, e.keep_alive = None, None, None
            e.state, e.error = ModelState.FAILED, reason

    async def _run_watched(
        self, name: str, endpoints: tuple[str, ...], work: Callable[[], T]
    ) -> tuple[asyncio.Future[T], tuple[tuple[str, ...], str] | None, threading.Thread]:
        """Run `work` on a thread of its own, until it ends or a worker of `endpoints` is
        lost (then the thread is abandoned where it waits). Its future, the loss (None
        when it ended first) and the thread."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(result)

        def run() -> None:
            try:
                result = work()
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        thread = threading.Thread(target=run, name=f"innkeeper-{name}", daemon=True)
        gone: asyncio.Future[tuple[tuple[str, ...], str]] = loop.create_future()
        self._loads[gone] = endpoints
        try:
            thread.start()
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            del self._loads[gone]
        if not gone.done():
            return done, None, thread
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return done, gone.result(), thread

    async def build(
        self,
        model_id: str,
        endpoints: tuple[str, ...],
        plan: MemoryPlan | None,
        build: Callable[[], tuple[Service, MemoryPlan | None]],
        pool: Executor,
    ) -> tuple[Service, MemoryPlan | None]:
        """Run `build` (the load of `model_id`, planned as `plan`); one across `endpoints`
        runs on a thread of its own, and a worker lost meanwhile ends the wait at once with
        WorkerLost, abandoning the load (see the module's docstring)."""
        if not endpoints:
            return await asyncio.get_running_loop().run_in_executor(pool, build)

        def loading() -> tuple[Service, MemoryPlan | None]:
            with rpc.loading(endpoints):
                return build()

        built, loss, thread = await self._run_watched(f"load-{model_id}", endpoints, loading)
        if loss is None:
            return built.result()
        workers, why = loss
        reason = (
            f"{why}: loading {model_id} failed; restart the worker, then load the model again "
            "(the memory the load took here stays in use until the server restarts)"
        )
        if built.done() and built.exception() is None:  # loaded, and lost just after
            service, loaded = built.result()
            _wreck(model_id, service, loaded, workers, reason)
        else:
            _stranded.append(Stranded(model_id, None, plan, workers, reason, time.time(), thread))
            log.error("%s", reason)
        raise WorkerLost(reason)

    async def close(self, model_id: str, service: Service, pool: Executor) -> None:
        """Free a model being unloaded. Across workers, the freeing talks to them: a worker
        lost meanwhile leaves that thread waiting for good, so the wait ends there (`strand`
        has stranded the model by then) and the registry goes on."""
        endpoints = tuple(service.settings.get("rpc", ()))  # the settings it was loaded with
        if not endpoints:
            await asyncio.get_running_loop().run_in_executor(pool, service.close)
            return

        def closing() -> None:
            with rpc.loading(endpoints):  # a worker lost while freeing is found and named
                service.close()

        closed, loss, _ = await self._run_watched(f"unload-{model_id}", endpoints, closing)
        if loss is None:
            closed.result()
        else:
            log.error("unloading %s: %s; it stays stranded", model_id, loss[1])


def _wreck(
    model_id: str,
    service: Service,
    plan: MemoryPlan | None,
    workers: tuple[str, ...],
    reason: str,
) -> None:
    """End a loaded model's requests and keep it for good (`_stranded`)."""
    service.closed = True  # new requests get a 503 and a retry
    n = service.engine.wreck(reason)
    _stranded.append(Stranded(model_id, service, plan, workers, reason, time.time()))
    log.error("%s (%d requests ended)", reason, n)

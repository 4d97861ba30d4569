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
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from innkeeper.engine import rpc
from innkeeper.models.memory import MemoryPlan
from innkeeper.serving.catalog import ModelState

if TYPE_CHECKING:
    from collections.abc import Callable

    from innkeeper.serving.registry import ModelRegistry
    from innkeeper.serving.service import Service

log = logging.getLogger("innkeeper.registry")


@dataclass(frozen=True)
class Stranded:
    """A model whose worker died: kept referenced for good (never freed, never collected)."""

    model_id: str
    service: Service
    plan: MemoryPlan | None
    workers: tuple[str, ...]  # the lost ones
    reason: str
    since: float  # time.time()

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
        """End every loaded model on a lost worker (event loop)."""
        lost = set(endpoints)
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
            service.closed = True  # new requests get a 503 and a retry
            n = service.engine.wreck(reason)
            _stranded.append(Stranded(e.id, service, e.loaded_plan, workers, reason, time.time()))
            e.service, e.loaded_plan, e.keep_alive = None, None, None
            e.state, e.error = ModelState.FAILED, reason
            log.error("%s (%d requests ended)", reason, n)

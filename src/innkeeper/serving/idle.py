"""Idle unload: a model nobody used for `--idle-unload` seconds (or its `keep_alive`) goes.

A task on the server's event loop checks every IDLE_CHECK_SECONDS; a model is unloaded only
while idle and while no load or unload holds the registry's lock, so an unload never races a
request that has just started using it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from innkeeper.serving.catalog import ModelEntry

if TYPE_CHECKING:
    from innkeeper.serving.registry import ModelRegistry

log = logging.getLogger("innkeeper.registry")

IDLE_CHECK_SECONDS = 0.5


class IdleUnloader:
    """The registry's idle-unload task."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def limit(self, e: ModelEntry) -> float | None:
        """Seconds of idleness after which `e` is unloaded; None: never."""
        if e.keep_alive is not None:
            return None if e.keep_alive < 0 else e.keep_alive
        return self.registry.config.idle_unload or None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_SECONDS)
            try:
                await self.unload_idle()
            except Exception:  # the loop must survive one bad unload
                log.exception("idle unload failed")

    async def unload_idle(self) -> None:
        registry = self.registry
        now = time.monotonic()
        for e in registry.loaded():
            limit = self.limit(e)
            svc = e.service
            if limit is None or svc is None or svc.busy or registry.lock.locked():
                continue
            if now - svc.last_used >= limit:
                async with registry.lock:
                    if e.service is svc and not svc.busy:
                        await registry.unload_locked(e, f"idle for {limit:g} s")

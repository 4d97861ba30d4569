"""Which loaded model serves a request: the one it names, waited for or loaded on demand.

A request for a model that is loading (or being unloaded) waits up to LOAD_WAIT_SECONDS; an
unloaded one is loaded only for a caller with the admin key and with autoload on; a
`keep_alive` the caller may not set is ignored. Embedding and rerank requests without a
model name go to the loaded model of their kind, never to one they would have to load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from innkeeper.serving.catalog import ModelEntry, ModelState
from innkeeper.serving.errors import LoadFailed, ModelBusy, ModelNotLoaded
from innkeeper.serving.load_settings import parse_keep_alive
from innkeeper.serving.policy import Caller, keep_alive_allowed

if TYPE_CHECKING:
    from innkeeper.serving.registry import ModelRegistry
    from innkeeper.serving.service import Service

log = logging.getLogger("innkeeper.registry")

LOAD_WAIT_SECONDS = 120.0  # a request for a loading model waits this long before a 503


async def service_for(
    registry: ModelRegistry, name: str | None, keep_alive: Any = None, *, caller: Caller
) -> Service:
    """The loaded service for a request naming `name` (None: the default): waits for a
    loading model, autoloads an unloaded one if the caller may (ModelNotLoaded if not,
    or with --no-autoload). A keep_alive the caller may not set is ignored."""
    config = registry.config
    ka = parse_keep_alive(keep_alive)
    if ka is not None and not keep_alive_allowed(caller, ka, config.idle_unload):
        log.info("ignoring keep_alive %g s from a client without the admin key", ka)
        ka = None
    deadline = time.monotonic() + LOAD_WAIT_SECONDS
    while True:
        e = registry.entry_for(name)
        if e.ready:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise ModelBusy(f"model {e.id!r} is still loading; try again shortly", retry_after=5)
        if e.state in (ModelState.LOADING, ModelState.DRAINING) or registry.lock.locked():
            was_loading = e.state is ModelState.LOADING
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_wait_idle_lock(registry), left)
            if was_loading and e.state is ModelState.FAILED:
                raise LoadFailed(
                    f"model {e.id!r} failed to load: {registry.shown(e.error, caller)}"
                )
            continue
        if not caller.admin:
            raise ModelNotLoaded(
                f"model {e.id!r} is not loaded, and on this server only an admin may load "
                "models: ask the admin to load it (with the --admin-key)"
            )
        if not config.autoload:
            raise ModelNotLoaded(
                f"model {e.id!r} is not loaded and this server does not load models on "
                "demand (--no-autoload): load it first with POST /models/load "
                f'{{"model": "{e.id}"}} (or /v1/internal/model/load, or the page)'
            )
        await asyncio.wait_for(asyncio.shield(registry.load(e.id, caller=caller)), left)
    assert e.service is not None
    if ka is not None:
        e.keep_alive = ka
    e.service.touch()
    return e.service


def embedding_entry(
    registry: ModelRegistry, name: str | None, kind: str = "embedding"
) -> ModelEntry:
    """The model an embedding (or, with kind "rerank", a reranking) request is served by:
    the one it names; with no name, the loaded model of that kind used last, else the
    default (a chat model embeds with mean pooling). A request never loads an embedding
    model it did not name."""
    if name:
        return registry.entry_for(name)
    ready = [e for e in registry.loaded() if e.kind == kind and e.ready]
    if ready:
        return max(ready, key=lambda e: e.service.last_used if e.service else 0.0)
    return registry.default


async def _wait_idle_lock(registry: ModelRegistry) -> None:
    async with registry.lock:
        pass

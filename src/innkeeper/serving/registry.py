"""The model registry: which models exist, which are loaded, and which serves a request
(serving/routing.py).

Loading builds the engine settings exactly as `serve` does (engine/planning.py: what was given,
the memory plan's choices for the rest), on a worker thread, so streams on other models keep
running. Everything that can fail cheaply (the file, the settings, the memory plan) is checked
before anything is evicted (serving/residency.py chooses what goes); a load that llama.cpp then
refuses puts back every model it evicted. `--models-max` caps how many are loaded.

Unloading never pulls a model from under a running stream: the model is DRAINING while it
waits up to `UNLOAD_DRAIN_SECONDS` for its requests to finish, then cancels the rest, which end
with their finish event (reason "abort"), and only then frees the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from innkeeper.engine.backend import BackendError, ModelLoadError
from innkeeper.engine.planning import (
    ModelFileError,
    checked_model_file,
    plan_settings,
    planned_engine,
)
from innkeeper.engine.templates import TemplateRenderError
from innkeeper.models.hardware import Hardware, hardware_with_overrides
from innkeeper.models.memory import AutoSettings, MemoryPlan
from innkeeper.models.spec import ModelFormatError
from innkeeper.serving import residency, routing, worker_loss
from innkeeper.serving.catalog import ModelEntry, ModelState, merge, scan
from innkeeper.serving.errors import (
    AdminRequired,
    BadLoadRequest,
    LoadFailed,
    ModelNotFound,
    ServingError,
)
from innkeeper.serving.idle import IdleUnloader
from innkeeper.serving.load_settings import LOAD_SETTINGS, parse_load_settings
from innkeeper.serving.policy import Caller, redact_paths
from innkeeper.serving.service import OFF_LOOP_THREADS, Service
from innkeeper.serving.worker_loss import WorkerLossWatch
from innkeeper.settings import ConfigError
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig

log = logging.getLogger("innkeeper.registry")

T = TypeVar("T")

UNLOAD_DRAIN_SECONDS = 30.0  # an unload waits this long for running requests, then cancels
CANCEL_GRACE_SECONDS = 10.0  # after cancelling, how long requests get to hand the model back
RESCAN_SECONDS = 2.0  # listings re-scan the folders at most this often (files copied in later)
# What a file or its settings can be wrong with: the client's problem (400), checked before
# anything is evicted, and again by llama.cpp itself (ModelLoadError) after.
BAD_MODEL_ERRORS = (ModelFileError, ModelFormatError, ConfigError, ModelLoadError)


class ModelRegistry:
    """Every model a client may name, their state, the default, LRU eviction, idle unload."""

    def __init__(
        self,
        config: ServerConfig,
        default_path: Path,
        *,
        hardware: Hardware | None = None,
        service_factory: Callable[..., Service] = Service,
    ) -> None:
        self.config = config
        self.default_path = default_path
        self.hardware = hardware or hardware_with_overrides(
            vram=config.plan_vram, ram=config.plan_ram
        )
        self.entries_by_id: dict[str, ModelEntry] = {}
        self.default_id = ""
        self.pool = ThreadPoolExecutor(OFF_LOOP_THREADS, thread_name_prefix="innkeeper-work")
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="innkeeper-load")
        self._lock: asyncio.Lock | None = None
        self.idle = IdleUnloader(self)
        self.worker_loss = WorkerLossWatch(self)
        self._service_factory = service_factory
        self._scanned = 0.0
        self.refresh()

    # ---- the list ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-scan the embedded model, the store and every --models-dir. Loaded and loading
        models stay; vanished unloaded ones leave the list."""
        self._merge(*self._scan())

    def _scan(self) -> tuple[list[ModelEntry], ModelEntry]:
        return scan(
            self.config.models_dirs,
            self.default_path,
            self.config.engine.chat_template,
            self.config.model_alias,
            self.config.engine.mmproj,
        )

    def _merge(self, found: list[ModelEntry], default: ModelEntry) -> None:
        self._scanned = time.monotonic()
        self.entries_by_id = merge(found, self.entries_by_id)
        if not self.default_id or self.default_id not in self.entries_by_id:
            self.default_id = default.id

    async def rescan(self) -> None:
        """Pick up models copied into a folder since the last scan (listing routes call this;
        at most once every RESCAN_SECONDS, the disk work off the event loop)."""
        if time.monotonic() - self._scanned < RESCAN_SECONDS:
            return
        self._scanned = time.monotonic()
        found, default = await self.off_loop(self._scan)
        self._merge(found, default)

    def entries(self) -> list[ModelEntry]:
        """Every model, the default first."""
        out = list(self.entries_by_id.values())
        out.sort(key=lambda e: e.id != self.default_id)
        return out

    def shown(self, text: str | None, caller: Caller) -> str | None:
        """`text` as this caller may see it: host paths only for admins."""
        if text is None or caller.admin:
            return text
        return redact_paths(text, [e.path for e in self.entries_by_id.values()])

    def entry_summary(self, e: ModelEntry, caller: Caller) -> dict[str, Any]:
        """What a model is and where it stands (status routes); host paths for admins only."""
        return {
            "id": e.id,
            "source": e.source,
            "path": str(e.path) if caller.admin else e.path.name,
            "format": "GGUF",
            "quantization": e.quantization,
            "size_bytes": e.size_bytes,
            "status": e.status,
            "kind": e.kind,
            "vision": e.mmproj is not None,  # a projector is paired: it takes images
            "is_default": e.id == self.default_id,
            "error": self.shown(e.error, caller),
        }

    def entry_json(self, e: ModelEntry, caller: Caller) -> dict[str, Any]:
        """An entry as the page's Models panel shows it: with its plan and load settings."""
        plan = e.loaded_plan
        if plan is None:
            auto = self.plan_of(e)
            plan = auto.plan if auto is not None else None
        return {
            **self.entry_summary(e, caller),
            "plan": plan.to_json() if plan is not None else None,
            "settings": self.settings_of(e),
            "store_name": e.store_name,
            "load_seconds": None if e.load_seconds is None else round(e.load_seconds, 3),
        }

    def settings_of(self, e: ModelEntry) -> dict[str, Any]:
        """The load settings in effect (loaded), or those a Load would use."""
        if e.service is not None:
            s = e.service.settings
            return {k: s[k] for k in LOAD_SETTINGS}
        planned = planned_engine(self._engine_config(e), self.plan_of(e))
        return {k: getattr(planned, k) for k in LOAD_SETTINGS}

    def resolve(self, name: str | None) -> ModelEntry:
        """The entry a client's name means (None or "": the default); unknown is a 404."""
        if not name:
            return self.entries_by_id[self.default_id]
        wanted = name.strip()
        if wanted.lower().startswith("innkeeper/"):  # KoboldCpp's /api/v1/model spelling
            wanted = wanted[len("innkeeper/") :]
        if wanted in self.entries_by_id:
            return self.entries_by_id[wanted]
        low = wanted.lower()
        for e in self.entries_by_id.values():
            if e.id.lower() == low or low in {n.lower() for n in e.names}:
                return e
        shown = ", ".join(self.entries_by_id)
        raise ModelNotFound(f"model {name!r} is not available; available models: {shown}")

    def entry_for(self, name: str | None) -> ModelEntry:
        """The entry a request naming `name` is served by. With one model to choose from, a
        client's `model` ("gpt-4o", whatever its settings hold) picks nothing; a name never
        opens a file."""
        return self.resolve(None if len(self.entries_by_id) == 1 else name)

    @property
    def default(self) -> ModelEntry:
        return self.entries_by_id[self.default_id]

    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.entries_by_id.values() if e.service is not None]

    # ---- settings and plans --------------------------------------------------------------
    def _engine_config(self, e: ModelEntry) -> EngineConfig:
        return replace(
            self.config.engine,
            model_path=e.path,
            chat_template=e.chat_template,
            mmproj=e.mmproj,
            **e.overrides,
        )

    def plan_of(self, e: ModelEntry, *, strict: bool = False) -> AutoSettings | None:
        """The memory plan for the entry's load settings on this machine (cached); with
        `strict`, a file that is not a readable model raises ModelFormatError."""
        cfg = self._engine_config(e)
        key = (cfg, e.size_bytes)
        if e.plan_cache is not None and e.plan_cache[0] == key and (e.plan_cache[1] or not strict):
            return e.plan_cache[1]
        try:
            auto = plan_settings(cfg, self.hardware)
        except ConfigError as exc:
            if strict:  # the request's settings (a worker too small for its share), not the file
                raise
            log.info("no memory plan for %s: %s", e.id, exc)
            auto = None
        except (ModelFormatError, OSError, ValueError) as exc:
            if strict:
                raise ModelFormatError(str(exc)) from exc
            log.info("no memory plan for %s: %s", e.id, exc)
            auto = None
        e.plan_cache = (key, auto)
        return auto

    def memory_json(self) -> dict[str, Any]:
        """The memory plan summed over the loaded models, per device."""
        return residency.memory_json(self.loaded())

    # ---- loading -------------------------------------------------------------------------
    def _build(self, e: ModelEntry) -> tuple[Service, MemoryPlan | None]:
        """Check the file, plan, load the engine (a worker thread, or the main one at start)."""
        from innkeeper.engine.engine import Engine

        path = checked_model_file(e.path, self.config.allow_pickle)
        cfg = replace(self._engine_config(e), model_path=path)
        auto = plan_settings(cfg, self.hardware)
        engine = Engine(planned_engine(cfg, auto))
        service = self._service_factory(
            engine,
            model_id=e.id,
            default_max_tokens=self.config.default_max_tokens,
            request_timeout=self.config.request_timeout,
            sse_ping_interval=self.config.sse_ping_interval,
            pool=self.pool,
        )
        return service, auto.plan if auto is not None else None

    def load_at_start(self) -> Service:
        """Load the default before the server starts (errors propagate to `serve`)."""
        e = self.default
        t0 = time.monotonic()
        service, plan = self._build(e)
        self._loaded(e, service, plan, time.monotonic() - t0)
        return service

    def _loaded(
        self, e: ModelEntry, service: Service, plan: MemoryPlan | None, seconds: float
    ) -> None:
        e.service, e.loaded_plan, e.load_seconds = service, plan, seconds
        e.state, e.error = ModelState.LOADED, None
        log.info("loaded %s in %.2f s", e.id, seconds)

    @property
    def lock(self) -> asyncio.Lock:
        """Held by every change of what is loaded (load, unload, delete of a file)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def load(
        self,
        name: str | None,
        settings: dict[str, Any] | None = None,
        *,
        caller: Caller,
        make_default: bool = False,
        strict: bool = True,
    ) -> Service:
        """Load a model (an admin action, or autoload); with `make_default`, route requests
        that name no model to it once it is loaded. Raises a ServingError with the reason."""
        self._require_admin(caller, "load")
        e = self.resolve(name)
        overrides = None
        if settings is not None:
            overrides = parse_load_settings(
                settings, strict=strict, allowed_rpc=self.config.engine.rpc
            )
        async with self.lock:
            if e.service is not None and (overrides is None or overrides == e.overrides):
                e.service.touch()
            else:
                before = e.overrides
                if overrides is not None:
                    e.overrides = overrides
                try:
                    await self._load_locked(e, before)
                except ServingError:
                    e.overrides = before  # settings that did not load are not its settings
                    raise
            if make_default:
                self.default_id = e.id
            assert e.service is not None
            return e.service

    async def _load_locked(self, e: ModelEntry, before: dict[str, Any]) -> None:
        """Load `e` with its (new) overrides; `before` are the settings it had, with which
        it is put back if it was loaded and the reload fails."""
        loop = asyncio.get_running_loop()
        # Checks that cost nothing to fail come first: a bad file or a plan that cannot fit
        # must not evict anything.
        try:
            await loop.run_in_executor(
                self._load_pool, checked_model_file, e.path, self.config.allow_pickle
            )
            auto = await loop.run_in_executor(self._load_pool, lambda: self.plan_of(e, strict=True))
            self._engine_config(e).validate()
        except BAD_MODEL_ERRORS as exc:
            log.warning("cannot load %s: %s", e.id, exc)
            if e.service is None and not isinstance(exc, ConfigError):
                e.state, e.error = ModelState.FAILED, str(exc)  # the file, not the request
            raise BadLoadRequest(f"cannot load {e.id}: {exc}") from None
        plan = auto.plan if auto is not None else None
        evict = residency.choose_evictions(
            e, plan, self.loaded(), self.config.models_max, worker_loss.held_plans()
        )
        if e.service is not None:  # new settings, and they passed every check: reload
            evict.insert(0, e)
        for victim in evict:
            why = "reload with new settings" if victim is e else f"to make room for {e.id}"
            await self._unload(victim, why)
        e.state, e.error = ModelState.LOADING, None
        e.loading = loop.create_future()
        t0 = time.monotonic()
        try:
            service, loaded_plan = await self._build_watched(e)
        except Exception as exc:
            error = self._load_error(e, exc)
            e.state, e.error = ModelState.FAILED, str(exc)
            e.loading.set_exception(error)
            e.loading.exception()  # retrieved: waiters re-raise it themselves
            e.loading = None
            e.overrides = before
            for victim in evict:  # put back what this load took away
                await self._restore(victim)
            raise error from None
        self._loaded(e, service, loaded_plan, time.monotonic() - t0)
        e.loading.set_result(service)
        e.loading = None

    def _build_watched(self, e: ModelEntry) -> Awaitable[tuple[Service, MemoryPlan | None]]:
        """`_build` off the event loop; WorkerLost as soon as a worker it loads across is
        lost (serving/worker_loss.py: that load is abandoned, with its plan held)."""
        auto = self.plan_of(e)  # cached: the load checked it first
        plan = auto.plan if auto is not None else None
        rpc = self._engine_config(e).rpc
        return self.worker_loss.build(e.id, rpc, plan, lambda: self._build(e), self._load_pool)

    @staticmethod
    def _load_error(e: ModelEntry, exc: Exception) -> ServingError:
        """A failed load as the client sees it: a file llama.cpp refuses is the client's
        problem (400); a lost worker is WorkerLost (502); anything else is the server's (500)."""
        log.warning("loading %s failed: %s", e.id, exc)
        if isinstance(exc, ServingError):
            return exc
        if isinstance(exc, (*BAD_MODEL_ERRORS, TemplateRenderError)):
            return BadLoadRequest(f"cannot load {e.id}: {exc}")
        return LoadFailed(f"loading {e.id} failed: {exc}")

    async def _restore(self, e: ModelEntry) -> None:
        """Reload a model evicted for a load that then failed (best effort)."""
        try:
            service, plan = await self._build_watched(e)
        except (BackendError, OSError, ValueError, ServingError) as exc:
            log.error("could not reload %s after a failed load: %s", e.id, exc)
            e.state, e.error = ModelState.FAILED, str(exc)
            return
        self._loaded(e, service, plan, 0.0)

    # ---- unloading -----------------------------------------------------------------------
    @staticmethod
    def _require_admin(caller: Caller, action: str) -> None:
        if not caller.admin:
            raise AdminRequired(
                f"only an admin may {action} models on this server: send the --admin-key"
            )

    async def unload(self, name: str | None, *, caller: Caller) -> ModelEntry:
        """Unload a model (None: the default); it stays listed, and stays the default."""
        self._require_admin(caller, "unload")
        e = self.resolve(name)
        async with self.lock:
            if e.service is not None:
                await self._unload(e, "unload")
        return e

    async def unload_locked(self, e: ModelEntry, why: str) -> None:
        """Unload `e` for a caller that already holds `lock` (deleting its file)."""
        assert self.lock.locked()
        await self._unload(e, why)

    async def _unload(self, e: ModelEntry, why: str) -> None:
        service = e.service
        if service is None:
            return
        e.state = ModelState.DRAINING
        try:
            deadline = time.monotonic() + UNLOAD_DRAIN_SECONDS
            while service.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if service.busy:
                n = service.abort()
                log.info("unloading %s (%s): cancelled %d running requests", e.id, why, n)
                grace = time.monotonic() + CANCEL_GRACE_SECONDS
                while service.users and time.monotonic() < grace:
                    service.abort()
                    await asyncio.sleep(0.05)
            service.closed = True
            await self.worker_loss.close(e.id, service, self._load_pool)
        finally:
            e.service, e.loaded_plan = None, None
            if e.state is ModelState.DRAINING:  # not stranded by a lost worker meanwhile
                e.state = ModelState.UNLOADED
            e.keep_alive = None
        log.info("unloaded %s (%s)", e.id, why)

    # ---- routing requests (serving/routing.py) --------------------------------------------
    async def service_for(
        self, name: str | None, keep_alive: Any = None, *, caller: Caller
    ) -> Service:
        """The loaded service for a request naming `name` (None: the default), waited for or
        loaded on demand when the caller may."""
        return await routing.service_for(self, name, keep_alive, caller=caller)

    def embedding_entry(self, name: str | None, kind: str = "embedding") -> ModelEntry:
        """The model an embedding (or rerank) request is served by; never one to load."""
        return routing.embedding_entry(self, name, kind)

    # ---- background: idle unload (serving/idle.py) ----------------------------------------
    def start(self) -> None:
        """Start idle unloading and the watch for lost RPC workers (on the server's loop)."""
        self.idle.start()
        self.worker_loss.start()

    async def stop(self) -> None:
        self.worker_loss.stop()
        await self.idle.stop()

    def cancel_all(self) -> int:
        """Cancel every generation of every loaded model (shutdown)."""
        return sum(e.service.cancel_all() for e in self.loaded() if e.service)

    def close(self) -> None:
        """Free every loaded model (the server is stopping)."""
        for e in self.loaded():
            if e.service is not None:
                e.service.close()
                e.service = None
                e.state = ModelState.UNLOADED
        self.pool.shutdown(wait=False)
        self._load_pool.shutdown(wait=False)

    async def context_size(self, name: str | None = None) -> int:
        """The model's context: loaded, its own; else what a load would give it (status
        polls such as SillyTavern's must not load a model that idled out)."""
        e = self.resolve(name)
        if e.service is not None:
            return e.service.n_ctx
        settings = await self.off_loop(lambda: self.settings_of(e))
        return int(settings["ctx_size"] or 0)

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run `work` on the registry's worker threads (JSON bodies, listings)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, work)

"""The model registry: every model a client may name, which are loaded, and which is the default.

Models come from three places: the embedded default, the store (`innkeeper pull`) and each
`--models-dir` (one GGUF per file, split GGUFs by their first part, one-model subfolders). A
name from HTTP resolves only to an entry of that list, never to a path.

Loading builds the engine settings exactly as `serve` does (engine/planning.py: what was given,
the memory plan's choices for the rest), on a worker thread, so streams on other models keep
running. Before a load, the plans of every model that would then be loaded must fit this
machine's RAM and VRAM (as detected at start, or `--ram`/`--vram`): the least recently used
idle models are evicted until they do, else the load is refused with what it needs and what is
free. `--models-max` caps how many are loaded (1: a load swaps).

Unloading never pulls a model from under a running stream: it waits up to
`UNLOAD_DRAIN_SECONDS` for the model's requests to finish, then cancels the rest, which end
with their finish event (reason "abort"), and only then frees the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from innkeeper.api.errors import ApiError
from innkeeper.api.service import OFF_LOOP_THREADS, Service
from innkeeper.engine.planning import (
    ModelFileError,
    checked_model_file,
    model_id_for,
    plan_settings,
    planned_engine,
)
from innkeeper.models import store
from innkeeper.models.filenames import quant_label, shard_of, unsharded
from innkeeper.models.hardware import Hardware, format_size, hardware_with_overrides
from innkeeper.models.memory import AutoSettings, MemoryPlan
from innkeeper.models.spec import ModelFormatError
from innkeeper.settings import ConfigError, parse_text, settings_of
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig

log = logging.getLogger("innkeeper.registry")

T = TypeVar("T")

STATUSES = ("unloaded", "loading", "loaded", "failed")
LOAD_WAIT_SECONDS = 120.0  # a request for a loading model waits this long before a 503
UNLOAD_DRAIN_SECONDS = 30.0  # an unload waits this long for running requests, then cancels
CANCEL_GRACE_SECONDS = 10.0  # after cancelling, how long requests get to hand the model back
IDLE_CHECK_SECONDS = 0.5
# Per-load settings a client may give (the page, text-generation-webui `args`, llama-server).
LOAD_SETTINGS = ("ctx_size", "gpu_layers", "cache_type_k", "cache_type_v", "flash_attn", "parallel")
SETTING_ALIASES = {
    "n_ctx": "ctx_size",
    "max_seq_len": "ctx_size",
    "ctx-size": "ctx_size",
    "n_gpu_layers": "gpu_layers",
    "ngl": "gpu_layers",
    "gpu-layers": "gpu_layers",
    "flash-attn": "flash_attn",
    "n_parallel": "parallel",
    "np": "parallel",
}
KEEP_ALIVE_PATTERN = r"^(-?[0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?$"  # Ollama's: 30s, 5m, 1h, -1
_DURATION = re.compile(KEEP_ALIVE_PATTERN)


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or "30s"/"5m"/"1h"; negative keeps it forever.

    None leaves the server's --idle-unload in charge; a bad value is a 400.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ApiError(400, f"keep_alive must be seconds or a duration like 5m (got {value!r})")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.fullmatch(str(value))
    if not m:
        raise ApiError(400, f"keep_alive must be seconds or a duration like 5m (got {value!r})")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]
    return float(m.group(1)) * scale


def parse_load_settings(raw: dict[str, Any] | None, *, strict: bool = True) -> dict[str, Any]:
    """Client load settings -> EngineConfig field values, parsed as the CLI parses them.

    Accepts the registry's names and the usual spellings of other servers (`n_ctx`,
    `n_gpu_layers`, `cache_type` for both K and V…); anything else is a 400 that lists what
    is accepted (a typo must not load silently with the defaults), unless not `strict`
    (text-generation-webui clients send their loader's other arguments too: ignored).
    """
    out: dict[str, Any] = {}
    specs = {f.name: spec for f, spec in settings_of(EngineConfig)}
    for key, value in (raw or {}).items():
        if value is None:
            continue
        name = SETTING_ALIASES.get(key, key)
        if name == "cache_type":
            out.setdefault("cache_type_k", value)
            out.setdefault("cache_type_v", value)
            continue
        if name not in LOAD_SETTINGS:
            if not strict:
                log.info("ignoring load argument %r", key)
                continue
            raise ApiError(
                400, f"unknown load setting {key!r}: use {', '.join(LOAD_SETTINGS)} (or cache_type)"
            )
        out[name] = value
    for name, value in list(out.items()):
        spec = specs[name]
        try:
            if name == "flash_attn" and isinstance(value, bool):
                value = "on" if value else "off"
            if name == "gpu_layers" and isinstance(value, int) and value < 0:
                value = 999
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value) if spec.parse is not None else int(value)
            out[name] = parse_text(spec, value)
            if name in ("ctx_size", "parallel") and not isinstance(out[name], int):
                out[name] = int(out[name])
        except (ConfigError, ValueError) as exc:
            raise ApiError(400, f"{name}: {exc}") from None
    return out


@dataclass
class ModelEntry:
    """One model a client may name, and what the registry knows about it."""

    id: str
    source: str  # "embedded" | "store" | "dir"
    path: Path
    size_bytes: int
    quantization: str | None = None
    store_name: str | None = None
    names: set[str] = field(default_factory=set)  # other spellings that resolve to it
    status: str = "unloaded"
    error: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # per-load settings last given
    service: Service | None = None
    loading: asyncio.Future[Service] | None = None
    draining: bool = False
    keep_alive: float | None = None  # None: --idle-unload decides
    loaded_plan: MemoryPlan | None = None
    _plan: tuple[tuple[Any, ...], AutoSettings | None] | None = None
    chat_template: str | None = None  # --chat-template applies to the model serve was given
    load_seconds: float | None = None


def _walk_dir(root: Path) -> list[tuple[str, Path]]:
    """(id, first GGUF) for each model under a --models-dir: files and one-model subfolders."""
    found: list[tuple[str, Path]] = []

    def models_in(folder: Path) -> list[Path]:
        out = []
        for p in sorted(folder.glob("*.gguf")):
            if p.name.lower().startswith("mmproj") or not p.is_file():
                continue
            shard = shard_of(p.name)
            if shard and shard[0] != 1:
                continue
            out.append(p)
        return out

    if not root.is_dir():
        log.warning("--models-dir %s is not a folder", root)
        return found
    for p in models_in(root):
        found.append((model_id_for(Path(unsharded(p.name))), p))
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        inner = models_in(sub)
        if len(inner) == 1:
            found.append((sub.name, inner[0]))
        else:  # several models in one folder: each by its file name
            found.extend((model_id_for(Path(unsharded(p.name))), p) for p in inner)
    return found


def find_in_models_dirs(name: str, folders: list[str] | tuple[str, ...]) -> Path | None:
    """The model a --models-dir offers under `name` (for `serve NAME --models-dir DIR`)."""
    wanted = name.strip().lower()
    for folder in folders:
        for model_id, path in _walk_dir(Path(folder).expanduser()):
            if wanted in (model_id.lower(), path.name.lower()):
                return path
    return None


def _size(path: Path) -> int:
    """Bytes of a model file, all parts of a split GGUF together."""
    try:
        shard = shard_of(path.name)
        if shard:
            base = unsharded(path.name)
            parts = [p for p in path.parent.glob("*.gguf") if unsharded(p.name) == base]
            return sum(p.stat().st_size for p in parts)
        return path.stat().st_size
    except OSError:
        return 0


class ModelRegistry:
    """Every model a client may name, their status, the default, LRU eviction, idle unload."""

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
        self._idle_task: asyncio.Task[None] | None = None
        self._service_factory = service_factory
        self.refresh()

    # ---- the list ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-scan the embedded model, the store and every --models-dir (after a pull or a
        delete). Loaded and loading models stay; vanished unloaded ones leave the list."""
        found: list[ModelEntry] = []
        embedded = store.embedded_entry()
        if embedded is not None:
            found.append(
                ModelEntry(
                    id=embedded.name,
                    source="embedded",
                    path=embedded.path,
                    size_bytes=embedded.size,
                    quantization=embedded.quant.upper() if embedded.quant else None,
                    names={embedded.path.name},
                )
            )
        try:
            pulled = store.list_models()
        except OSError as exc:
            log.warning("cannot read the model store: %s", exc)
            pulled = []
        for e in pulled:
            if e.format != "gguf" or not e.complete:
                continue
            found.append(
                ModelEntry(
                    id=e.name,
                    source="store",
                    path=e.path,
                    size_bytes=e.size,
                    quantization=e.quant,
                    store_name=e.name,
                    names={e.path.name},
                )
            )
        for folder in self.config.models_dirs:
            for model_id, path in _walk_dir(Path(folder).expanduser()):
                found.append(
                    ModelEntry(
                        id=model_id,
                        source="dir",
                        path=path,
                        size_bytes=_size(path),
                        quantization=quant_label(path.name),
                        names={path.name},
                    )
                )
        # The model `serve` was given: the default, under --alias if one was given.
        default_path = self.default_path
        default = next((e for e in found if _same_file(e.path, default_path)), None)
        if default is None:
            default = ModelEntry(
                id=model_id_for(Path(unsharded(default_path.name))),
                source="dir",
                path=default_path,
                size_bytes=_size(default_path),
                quantization=quant_label(default_path.name),
                names={default_path.name},
            )
            found.insert(0, default)
        default.chat_template = self.config.engine.chat_template
        if self.config.model_alias:
            default.names.add(default.id)
            default.id = self.config.model_alias

        new: dict[str, ModelEntry] = {}
        paths: list[Path] = []
        for e in found:
            if any(_same_file(e.path, p) for p in paths):
                continue  # the same file through a symlink or a second folder
            paths.append(e.path)
            base, n = e.id, 2
            while e.id in new:
                e.id = f"{base}-{n}"
                n += 1
            old = self.entries_by_id.get(e.id)
            if old is not None and _same_file(old.path, e.path):
                old.names |= e.names
                old.size_bytes = e.size_bytes or old.size_bytes
                e = old  # keep status, service and settings
            new[e.id] = e
        for old in self.entries_by_id.values():  # never forget a model that is in use
            if old.id not in new and (old.service is not None or old.loading is not None):
                new[old.id] = old
        self.entries_by_id = new
        if not self.default_id or self.default_id not in new:
            self.default_id = default.id

    def entries(self) -> list[ModelEntry]:
        """Every model, the default first."""
        out = list(self.entries_by_id.values())
        out.sort(key=lambda e: e.id != self.default_id)
        return out

    def entry_json(self, e: ModelEntry) -> dict[str, Any]:
        """An entry as the page and the llama-server/innkeeper routes show it."""
        plan = e.loaded_plan
        if plan is None:
            auto = self.plan_of(e)
            plan = auto.plan if auto is not None else None
        return {
            "id": e.id,
            "source": e.source,
            "path": str(e.path),
            "format": "GGUF",
            "quantization": e.quantization,
            "size_bytes": e.size_bytes,
            "status": e.status,
            "is_default": e.id == self.default_id,
            "plan": plan.to_json() if plan is not None else None,
            "settings": self.settings_of(e),
            "error": e.error,
            "store_name": e.store_name,
            "load_seconds": None if e.load_seconds is None else round(e.load_seconds, 3),
        }

    def settings_of(self, e: ModelEntry) -> dict[str, Any]:
        """The load settings in effect (loaded), or those a Load would use."""
        if e.service is not None:
            s = e.service.settings
            return {k: s[k] for k in LOAD_SETTINGS}
        cfg = self._engine_config(e)
        auto = self.plan_of(e)
        planned = planned_engine(cfg, auto)
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
        raise ApiError(
            404,
            f"model {name!r} is not available; available models: {shown}",
            "not_found_error",
        )

    @property
    def default(self) -> ModelEntry:
        return self.entries_by_id[self.default_id]

    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.entries_by_id.values() if e.service is not None]

    # ---- settings and plans --------------------------------------------------------------
    def _engine_config(self, e: ModelEntry) -> EngineConfig:
        return replace(
            self.config.engine, model_path=e.path, chat_template=e.chat_template, **e.overrides
        )

    def plan_of(self, e: ModelEntry, *, strict: bool = False) -> AutoSettings | None:
        """The memory plan for the entry's load settings on this machine (cached); with
        `strict`, a file that is not a readable model raises ModelFormatError."""
        cfg = self._engine_config(e)
        key = (cfg, e.size_bytes)
        if e._plan is not None and e._plan[0] == key and (e._plan[1] or not strict):
            return e._plan[1]
        try:
            auto = plan_settings(cfg, self.hardware)
        except (ModelFormatError, OSError, ValueError) as exc:
            if strict:
                raise ModelFormatError(str(exc)) from exc
            log.info("no memory plan for %s: %s", e.id, exc)
            auto = None
        e._plan = (key, auto)
        return auto

    def fit_problem(self, plans: list[MemoryPlan]) -> str | None:
        """Why these plans together do not fit this machine (None when they do)."""
        need: dict[tuple[str, str], int] = {}
        room: dict[tuple[str, str], tuple[int, int]] = {}
        for plan in plans:
            for d in plan.devices:
                key = (d.kind, d.name)
                need[key] = need.get(key, 0) + d.total_bytes
                room[key] = (d.capacity_bytes, d.margin_bytes)
        for key, bytes_ in need.items():
            capacity, margin = room[key]
            if bytes_ + margin > capacity:
                where = "RAM" if key[0] == "ram" else key[1]
                return (
                    f"needs {format_size(bytes_)} of {where} (with the models it would stay "
                    f"loaded beside) but {format_size(max(capacity - margin, 0))} is free to use"
                )
        return None

    def memory_json(self) -> dict[str, Any]:
        """The memory plan summed over the loaded models, per device."""
        devices: dict[tuple[str, str], dict[str, Any]] = {}
        for e in self.loaded():
            if e.loaded_plan is None:
                continue
            for d in e.loaded_plan.devices:
                row = devices.setdefault(
                    (d.kind, d.name),
                    {
                        "name": d.name,
                        "kind": d.kind,
                        "total_bytes": 0,
                        "capacity_bytes": d.capacity_bytes,
                        "margin_bytes": d.margin_bytes,
                        "models": {},
                    },
                )
                row["total_bytes"] += d.total_bytes
                row["models"][e.id] = d.total_bytes
        for row in devices.values():
            row["fits"] = row["total_bytes"] + row["margin_bytes"] <= row["capacity_bytes"]
        return {
            "models": [e.id for e in self.loaded()],
            "total_bytes": sum(r["total_bytes"] for r in devices.values()),
            "devices": list(devices.values()),
        }

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
        e.status, e.error = "loaded", None
        log.info("loaded %s in %.2f s", e.id, seconds)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def load(
        self,
        name: str | None,
        settings: dict[str, Any] | None = None,
        *,
        make_default: bool = False,
        strict: bool = True,
    ) -> Service:
        """Load a model (an admin action, or autoload); with `make_default`, route requests
        that name no model to it once it is loaded. Raises ApiError with the reason."""
        e = self.resolve(name)
        overrides = None
        if settings is not None:
            overrides = parse_load_settings(settings, strict=strict)
        async with self.lock:
            if e.service is not None and (overrides is None or overrides == e.overrides):
                e.service.touch()
            else:
                before, was_loaded = e.overrides, e.service is not None
                if overrides is not None:
                    e.overrides = overrides
                try:
                    await self._load_locked(e)
                except ApiError:
                    e.overrides = before  # settings that did not load are not its settings
                    if was_loaded and e.service is None:  # a reload failed: back as it was
                        await self._restore(e)
                    raise
            if make_default:
                self.default_id = e.id
            assert e.service is not None
            return e.service

    async def _load_locked(self, e: ModelEntry) -> None:
        loop = asyncio.get_running_loop()
        # Checks that cost nothing to fail come first: a bad file or a plan that cannot fit
        # must not evict anything.
        try:
            await loop.run_in_executor(
                self._load_pool, checked_model_file, e.path, self.config.allow_pickle
            )
            auto = await loop.run_in_executor(self._load_pool, lambda: self.plan_of(e, strict=True))
            self._check_config(e)
        except (ModelFileError, ModelFormatError, ConfigError) as exc:
            log.warning("cannot load %s: %s", e.id, exc)
            self._failed(e, str(exc))
            raise ApiError(400, f"cannot load {e.id}: {exc}", "invalid_request_error") from None
        evict = self._choose_evictions(e, auto)
        previous_default = self.default if self.default.service is not None else None
        if e.service is not None:  # new settings, and they passed every check: reload
            await self._unload(e, "reload with new settings")
        for victim in evict:
            await self._unload(victim, f"to make room for {e.id}")
        e.status, e.error = "loading", None
        e.loading = loop.create_future()
        t0 = time.monotonic()
        try:
            service, plan = await loop.run_in_executor(self._load_pool, self._build, e)
        except Exception as exc:
            log.warning("loading %s failed: %s", e.id, exc)
            self._failed(e, str(exc))
            e.loading.set_exception(ApiError(500, f"loading {e.id} failed: {exc}", "load_error"))
            e.loading.exception()  # retrieved: waiters re-raise it themselves
            e.loading = None
            if previous_default is not None and previous_default in evict:
                await self._restore(previous_default)
            raise ApiError(500, f"loading {e.id} failed: {exc}", "load_error") from None
        self._loaded(e, service, plan, time.monotonic() - t0)
        e.loading.set_result(service)
        e.loading = None

    def _check_config(self, e: ModelEntry) -> None:
        self._engine_config(e).validate()

    def _failed(self, e: ModelEntry, error: str) -> None:
        """Record why a load failed; a model still loaded (a refused reload) stays loaded."""
        e.error = error
        if e.service is None:
            e.status = "failed"

    async def _restore(self, e: ModelEntry) -> None:
        """Reload a default evicted for a load that then failed (best effort)."""
        try:
            service, plan = await asyncio.get_running_loop().run_in_executor(
                self._load_pool, self._build, e
            )
        except Exception as exc:  # pragma: no cover - the same file loaded a moment ago
            log.error("could not reload %s after a failed load: %s", e.id, exc)
            self._failed(e, str(exc))
            return
        self._loaded(e, service, plan, 0.0)

    def _choose_evictions(self, e: ModelEntry, auto: AutoSettings | None) -> list[ModelEntry]:
        """Which loaded models must go for `e` to load: LRU first; the cap may take a busy
        one (its unload waits for its requests), memory only idle ones. Refuses (409) when
        even that does not make room, before anything is evicted."""
        others = sorted((x for x in self.loaded() if x is not e), key=_last_used)
        evict: list[ModelEntry] = []
        over = len(others) + 1 - self.config.models_max
        if over > 0:
            evict = sorted(others, key=lambda x: (_busy(x), _last_used(x)))[:over]
        if auto is None:
            return evict
        keep = [x for x in others if x not in evict]

        def plans(models: list[ModelEntry]) -> list[MemoryPlan]:
            return [x.loaded_plan for x in models if x.loaded_plan is not None] + [auto.plan]

        for candidate in [x for x in keep if not _busy(x)]:
            if self.fit_problem(plans(keep)) is None:
                break
            keep.remove(candidate)
            evict.append(candidate)
        problem = self.fit_problem(plans(keep))
        if problem is not None:
            busy = [x.id for x in keep]
            extra = f" ({', '.join(busy)} stay loaded: in use)" if busy else ""
            message = f"not enough memory to load {e.id}: it {problem}{extra}"
            log.warning("%s", message)
            self._failed(e, message)
            raise ApiError(409, message, "insufficient_memory")
        return evict

    # ---- unloading -----------------------------------------------------------------------
    async def unload(self, name: str | None) -> None:
        """Unload a model (None: the default); it stays listed, and stays the default."""
        e = self.resolve(name)
        async with self.lock:
            if e.service is not None:
                await self._unload(e, "unload")

    async def _unload(self, e: ModelEntry, why: str) -> None:
        service = e.service
        if service is None:
            return
        e.draining = True
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
            await asyncio.get_running_loop().run_in_executor(self._load_pool, service.close)
        finally:
            e.draining = False
            e.service, e.loaded_plan = None, None
            if e.status == "loaded":
                e.status = "unloaded"
            e.keep_alive = None
        log.info("unloaded %s (%s)", e.id, why)

    # ---- routing requests ----------------------------------------------------------------
    async def service_for(self, name: str | None, keep_alive: Any = None) -> Service:
        """The loaded service for a request naming `name` (None: the default): waits for a
        loading model, autoloads an unloaded one (409 with --no-autoload)."""
        ka = parse_keep_alive(keep_alive)
        if name and len(self.entries_by_id) == 1:
            # One model to choose from: a client's `model` ("gpt-4o", whatever its settings
            # hold) picks nothing, as before the registry; a name never opens a file.
            name = None
        deadline = time.monotonic() + LOAD_WAIT_SECONDS
        while True:
            e = self.resolve(name)
            if e.service is not None and not e.draining:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(
                    503,
                    f"model {e.id!r} is still loading; try again shortly",
                    "service_unavailable",
                    headers={"Retry-After": "5"},
                )
            if e.loading is not None or e.draining or self.lock.locked():
                was_loading = e.loading is not None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wait_idle_lock(), left)
                if was_loading and e.service is None and e.status == "failed":
                    raise ApiError(500, f"model {e.id!r} failed to load: {e.error}", "load_error")
                continue
            if not self.config.autoload:
                raise ApiError(
                    409,
                    f"model {e.id!r} is not loaded and this server does not load models on "
                    "demand (--no-autoload): load it first with POST /models/load "
                    f'{{"model": "{e.id}"}} (or /v1/internal/model/load, or the page)',
                    "model_not_loaded",
                )
            await asyncio.wait_for(asyncio.shield(self.load(e.id)), left)
        assert e.service is not None
        if ka is not None:
            e.keep_alive = ka
        e.service.touch()
        return e.service

    async def _wait_idle_lock(self) -> None:
        async with self.lock:
            pass

    # ---- background: idle unload ---------------------------------------------------------
    def start(self) -> None:
        """Start idle unloading (on the server's event loop)."""
        if self._idle_task is None:
            self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop())

    async def stop(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
            self._idle_task = None

    def idle_limit(self, e: ModelEntry) -> float | None:
        """Seconds of idleness after which `e` is unloaded; None: never."""
        if e.keep_alive is not None:
            return None if e.keep_alive < 0 else e.keep_alive
        return self.config.idle_unload or None

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_SECONDS)
            try:
                await self.unload_idle()
            except Exception:  # the loop must survive one bad unload
                log.exception("idle unload failed")

    async def unload_idle(self) -> None:
        now = time.monotonic()
        for e in self.loaded():
            limit = self.idle_limit(e)
            svc = e.service
            if limit is None or svc is None or svc.busy or self.lock.locked():
                continue
            if now - svc.last_used >= limit:
                async with self.lock:
                    if e.service is svc and not svc.busy:
                        await self._unload(e, f"idle for {limit:g} s")

    def cancel_all(self) -> int:
        """Cancel every generation of every loaded model (shutdown)."""
        return sum(e.service.cancel_all() for e in self.loaded() if e.service)

    def close(self) -> None:
        """Free every loaded model (the server is stopping)."""
        for e in self.loaded():
            if e.service is not None:
                e.service.close()
                e.service = None
                e.status = "unloaded"
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _last_used(e: ModelEntry) -> float:
    return e.service.last_used if e.service is not None else 0.0


def _busy(e: ModelEntry) -> bool:
    return e.service is not None and e.service.busy

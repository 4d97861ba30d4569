"""Ollama's model routes: /api/tags, /api/show, /api/ps, and how Ollama names map to models.

Ollama names are `name:tag`. innkeeper's store names already carry a tag (`Qwen2.5-0.5B-
Instruct:Q4_K_M`); every other model gets `:latest`, so `SmolLM2-135M-Instruct.Q4_1:latest`
names the embedded model. A name without a tag, or any spelling the registry knows, resolves
too. Nothing here loads a model: details of an unloaded one come from its GGUF header.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from innkeeper.api.errors import ApiError
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.params import JsonBody
from innkeeper.api.state import registry_of
from innkeeper.api.status import FILE_TYPES
from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.spec import ModelFormatError, ModelSpec, format_params
from innkeeper.serving.catalog import ModelEntry
from innkeeper.serving.errors import ModelNotFound
from innkeeper.serving.registry import ModelRegistry

log = logging.getLogger("innkeeper.api.ollama")


class OllamaRoute(OffLoopBodyRoute):
    """A body is JSON whatever its Content-Type, as Ollama reads it: its docs' examples
    (`curl URL -d '{...}'`) send the form type."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
            if hasattr(request, "_headers"):
                del request._headers  # Starlette re-reads them from the scope
            return await handler(request)

        return route


router = APIRouter(tags=["Ollama"], route_class=OllamaRoute)

LATEST = ":latest"
SPECS_REMEMBERED = 256  # GGUF headers read for listings, by (path, size, mtime)
# Go's longest time.Duration: what Ollama reports as the expiry of a model kept forever
FOREVER = timedelta(days=106751)
_specs: dict[tuple[str, int, int], ModelSpec | None] = {}


def iso(t: datetime) -> str:
    """A time as Ollama writes it (RFC 3339, UTC)."""
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def now_iso() -> str:
    """`iso` of now, which is UTC already: no conversion, no replace (once per streamed
    token)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")[:-6] + "Z"


def ollama_name(e: ModelEntry) -> str:
    """The name /api/tags lists for an entry: its id, with `:latest` unless it has a tag."""
    return e.id if ":" in e.id else e.id + LATEST


def resolve(registry: ModelRegistry, name: str) -> ModelEntry:
    """The entry an Ollama name means: exactly (Ollama clients name what /api/tags listed;
    an unknown name is Ollama's 404, which clients such as `ollama run` act on)."""
    wanted = name.strip()
    candidates = [wanted]
    if wanted.lower().endswith(LATEST):
        candidates.append(wanted[: -len(LATEST)])
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return registry.resolve(candidate)
        except ModelNotFound:
            continue
    raise ApiError(404, f"model '{name}' not found", "not_found_error")


def _read_spec(path: Path) -> ModelSpec | None:
    """The model's GGUF header (cached per file version); None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _specs:
        try:
            _specs[key] = read_gguf_spec(path)
        except (ModelFormatError, OSError) as exc:
            log.info("no GGUF header for %s: %s", path.name, exc)
            _specs[key] = None
        while len(_specs) > SPECS_REMEMBERED:
            del _specs[next(iter(_specs))]
    return _specs[key]


def digest(e: ModelEntry) -> str:
    """Identifies this version of the file (name, size, mtime): it changes when the file does.
    Not a hash of the weights, which would read gigabytes per listing."""
    try:
        mtime = e.path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return hashlib.sha256(f"{e.path.name}|{e.size_bytes}|{mtime}".encode()).hexdigest()


def modified_at(e: ModelEntry) -> str:
    try:
        return iso(datetime.fromtimestamp(e.path.stat().st_mtime, timezone.utc))
    except OSError:
        return now_iso()


def details(e: ModelEntry, spec: ModelSpec | None) -> dict[str, Any]:
    """Ollama's `details`: from the loaded model if it is loaded, else its GGUF header."""
    family = spec.architecture if spec is not None else ""
    params = spec.parameters if spec is not None else 0
    quant = e.quantization or (spec.quantization if spec is not None else None)
    if e.service is not None:
        info = e.service.info
        family, params = info.architecture or family, info.n_params or params
        quant = FILE_TYPES.get(info.file_type or "", quant) or quant
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": format_params(params) if params else "",
        "quantization_level": quant or "",
    }


def model_row(e: ModelEntry, spec: ModelSpec | None) -> dict[str, Any]:
    """What /api/tags and /api/ps share about one model."""
    name = ollama_name(e)
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at(e),
        "size": e.size_bytes,
        "digest": digest(e),
        "details": details(e, spec),
    }


@router.get("/api/tags", include_in_schema=False)
async def tags(request: Request) -> dict[str, Any]:
    """Every model a request may name, loaded or not, the default first (SillyTavern's
    Ollama type lists these; it hangs if this is not 200 with a `models` list)."""
    registry = registry_of(request)
    await registry.rescan()
    entries = registry.entries()
    return {
        "models": await registry.off_loop(
            lambda: [model_row(e, _read_spec(e.path)) for e in entries]
        )
    }


def _expires_at(registry: ModelRegistry, e: ModelEntry) -> str:
    """When idle unload will take the model if nobody uses it meanwhile."""
    limit = registry.idle.limit(e)
    now = datetime.now(timezone.utc)
    if limit is None or e.service is None:
        return iso(now + FOREVER)
    idle = time.monotonic() - e.service.last_used
    return iso(now + timedelta(seconds=max(limit - idle, 0.0)))


def _sizes(e: ModelEntry) -> tuple[int, int]:
    """(bytes in memory, bytes of them in VRAM) from the plan the model was loaded with."""
    plan = e.loaded_plan
    if plan is None:
        return e.size_bytes, 0
    total = sum(d.total_bytes for d in plan.devices)
    vram = sum(d.total_bytes for d in plan.devices if d.kind != "ram")
    return total, vram


@router.get("/api/ps", include_in_schema=False)
async def ps(request: Request) -> dict[str, Any]:
    """The loaded models, with memory use and when idle unload would take them."""
    registry = registry_of(request)
    loaded = registry.loaded()
    rows = await registry.off_loop(lambda: [model_row(e, _read_spec(e.path)) for e in loaded])
    for e, row in zip(loaded, rows, strict=True):
        size, vram = _sizes(e)
        row.pop("modified_at")
        row.update(
            size=size,
            size_vram=vram,
            expires_at=_expires_at(registry, e),
            context_length=e.service.n_ctx if e.service is not None else 0,
        )
    return {"models": rows}


class ShowBody(JsonBody):
    model: str | None = None
    name: str | None = Field(None, description="Ollama's older spelling of `model`")
    verbose: bool = False


def _parameters(e: ModelEntry, spec: ModelSpec | None) -> dict[str, Any]:
    """The Modelfile PARAMETERs innkeeper can state: the context and the template's stops."""
    out: dict[str, Any] = {}
    if e.service is not None:
        out["num_ctx"] = e.service.n_ctx
        out["stop"] = [s for s in e.service.template.stop if s]
    elif spec is not None and spec.context_length:
        out["num_ctx"] = spec.context_length
    return out


def _model_info(e: ModelEntry, spec: ModelSpec | None) -> dict[str, Any]:
    """Ollama's `model_info`: GGUF keys as llama.cpp names them, as far as innkeeper read them."""
    if spec is None:
        return {}
    arch = spec.architecture
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": spec.parameters,
        f"{arch}.context_length": spec.context_length,
        f"{arch}.block_count": spec.n_layer,
        f"{arch}.embedding_length": spec.n_embd,
        f"{arch}.attention.head_count": spec.n_head,
    }
    if isinstance(spec.n_head_kv, int):
        info[f"{arch}.attention.head_count_kv"] = spec.n_head_kv
    if spec.name:
        info["general.name"] = Path(spec.name).name
    if e.service is not None:
        info["general.parameter_count"] = e.service.info.n_params or spec.parameters
    return info


def show_json(e: ModelEntry, spec: ModelSpec | None) -> dict[str, Any]:
    params = _parameters(e, spec)
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<15} {v if isinstance(v, int) else _quote(v)}")
    template = spec.chat_template if spec is not None else None
    if e.service is not None and e.service.template.source is not None:
        template = e.service.template.source
    modelfile = [f"FROM {ollama_name(e)}"]
    if template:
        modelfile.append(f'TEMPLATE """{template}"""')
    modelfile += [f"PARAMETER {line}" for line in lines]
    return {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": "\n".join(lines),
        "template": template or "",
        "details": details(e, spec),
        "model_info": _model_info(e, spec),
        "capabilities": ["completion"],
        "modified_at": modified_at(e),
    }


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@router.post("/api/show", include_in_schema=False)
async def show(request: Request, body: ShowBody) -> dict[str, Any]:
    """What innkeeper knows about a model (never loads it): its details, GGUF numbers, the
    chat template (Jinja, as the GGUF carries it: innkeeper runs no Go templates)."""
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model is required")
    registry = registry_of(request)
    e = resolve(registry, name)
    spec = await registry.off_loop(lambda: _read_spec(e.path))
    return show_json(e, spec)

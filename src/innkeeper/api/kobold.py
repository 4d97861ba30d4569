"""KoboldAI United and KoboldCpp routes (/api/v1/*, /api/latest/*, /api/extra/*).

SillyTavern's KoboldCpp type counts tokens with /api/extra/tokencount and stops with
/api/extra/abort; its "KoboldAI Classic" API generates through /api/v1/generate and
/api/extra/generate/stream. Responses copy KoboldCpp 1.76's shapes.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from innkeeper import __version__
from innkeeper.api import images
from innkeeper.api.errors import ApiError, check_finish, finish_error
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.params import JsonBody, ParamError, SamplerFields, normalise
from innkeeper.api.state import registry_of, use_model
from innkeeper.api.streaming import ChunkTemplate, json_str, slot, sse, sse_response
from innkeeper.engine.events import Event, FinishEvent, TokenEvent
from innkeeper.engine.vision import MARKER, MediaPrompt
from innkeeper.serving.service import Service

router = APIRouter(tags=["KoboldAI / KoboldCpp"], route_class=OffLoopBodyRoute)

KOBOLD_API_VERSION = "1.2.5"
KOBOLDCPP_COMPAT_VERSION = "1.76"
DEFAULT_MAX_LENGTH = 180  # KoboldCpp's default when a request gives none


class KoboldGenerateBody(SamplerFields):
    prompt: str = ""
    memory: str = ""
    trim_stop: bool = False
    genkey: str | None = None
    quiet: bool = False
    images: list[str] | None = None  # base64, KoboldCpp's: placed after memory, before prompt


class GenkeyBody(JsonBody):
    genkey: str | None = None


class TokenCountBody(JsonBody):
    prompt: str = ""
    special: bool = True


async def _optional_body(request: Request) -> GenkeyBody:
    """Abort and check are sent with no body at all by SillyTavern; a body is optional."""
    raw = await request.body()
    if not raw.strip():
        return GenkeyBody()
    try:
        return GenkeyBody.model_validate_json(raw)
    except ValueError:
        return GenkeyBody()


async def _count(request: Request, text: str, *, add_special: bool) -> list[int]:
    """Token ids for a count route (off the event loop; too long a text is a 422)."""
    try:
        service = await use_model(request)
        return await service.tokenize(text, add_special, request=request)
    except ParamError as exc:
        raise ApiError(422, str(exc)) from exc


def _model_name(request: Request) -> str:
    """KoboldCpp's spelling of the current default model (SillyTavern shows it)."""
    return f"innkeeper/{registry_of(request).default.id}"


async def _start(request: Request, service: Service, body: KoboldGenerateBody) -> Any:
    try:
        gen = normalise(body, n_vocab=service.n_vocab)
        limit = service.prompt_limit(gen)
        media = None
        if body.images:
            image_limits = images.limits_of(request)
            images.check_count(len(body.images), image_limits)
            text = body.memory + MARKER * len(body.images) + body.prompt

            def work(_cancel: object) -> MediaPrompt:
                raw = [images.from_data_uri(b) for b in body.images or ()]
                return images.media_prompt(service, text, raw, image_limits, limit)

            media = await service.off_loop(work, request)
            prompt = media.tokens
        else:
            prompt = await service.tokenize(body.memory + body.prompt, request=request, limit=limit)
        await service.check_grammar(gen.params.grammar)
        return service.start(
            prompt,
            gen,
            default_max_tokens=service.default_max_tokens or DEFAULT_MAX_LENGTH,
            genkey=body.genkey,
            media=media,
        )
    except ParamError as exc:
        raise ApiError(422, str(exc)) from exc


def _kobold_reason(ev: FinishEvent) -> str:
    return "length" if ev.reason == "length" else "stop"


def _text_with_stop(ev: FinishEvent, trim_stop: bool) -> str:
    """KoboldCpp keeps the matched stop string unless the client asks to trim it."""
    return ev.text if trim_stop or not ev.stop_string else ev.text + ev.stop_string


for prefix in ("/api/v1", "/api/latest"):
    include = prefix == "/api/v1"

    @router.get(f"{prefix}/model", include_in_schema=include)
    async def model(request: Request) -> dict[str, str]:
        return {"result": _model_name(request)}

    @router.get(f"{prefix}/info/version", include_in_schema=include)
    async def info_version() -> dict[str, str]:
        return {"result": KOBOLD_API_VERSION}

    @router.get(f"{prefix}/config/max_context_length", include_in_schema=include)
    async def max_context_length(request: Request) -> dict[str, int]:
        return {"value": await registry_of(request).context_size()}

    @router.get(f"{prefix}/config/max_length", include_in_schema=include)
    async def max_length(request: Request) -> dict[str, int]:
        max_tokens = request.app.state.config.default_max_tokens
        return {"value": max_tokens or DEFAULT_MAX_LENGTH}

    @router.get(f"{prefix}/config/soft_prompts_list", include_in_schema=include)
    async def soft_prompts_list() -> dict[str, list[str]]:
        return {"values": []}

    @router.get(f"{prefix}/config/soft_prompt", include_in_schema=include)
    async def soft_prompt() -> dict[str, str]:
        return {"value": ""}

    @router.post(f"{prefix}/generate", include_in_schema=include)
    async def generate(request: Request, body: KoboldGenerateBody) -> dict[str, Any]:
        service = await use_model(request)
        running = await _start(request, service, body)
        ev = await service.collect(request, running)
        check_finish(ev)
        return {
            "results": [
                {"text": _text_with_stop(ev, body.trim_stop), "finish_reason": _kobold_reason(ev)}
            ]
        }

    @router.post(f"{prefix}/token-count", include_in_schema=include)
    async def legacy_token_count(request: Request, body: TokenCountBody) -> dict[str, Any]:
        """text-generation-webui's pre-2023 API, which SillyTavern's "Legacy API" option uses."""
        ids = await _count(request, body.prompt, add_special=True)
        return {"results": [{"tokens": len(ids)}]}


# A token's event, as `sse({"token": text, "finish_reason": "null"}, event="message")`.
_TOKEN = ChunkTemplate({"token": slot(0), "finish_reason": "null"}, before="event: message\ndata: ")


@router.post("/api/extra/generate/stream")
async def generate_stream(request: Request, body: KoboldGenerateBody) -> Any:
    service = await use_model(request)
    running = await _start(request, service, body)

    def frame(ev: Event) -> bytes:
        if isinstance(ev, TokenEvent):
            return _TOKEN(json_str(ev.text)) if ev.text else b""
        if ev.reason == "error":
            err = finish_error(ev)
            return sse({"detail": {"msg": err.message, "type": err.type}}, event="message")
        tail = "" if body.trim_stop or not ev.stop_string else ev.stop_string
        return sse({"token": tail, "finish_reason": _kobold_reason(ev)}, event="message")

    return sse_response(service, running, frame, tail=None)


@router.api_route("/api/extra/generate/check", methods=["GET", "POST"])
async def generate_check(request: Request) -> dict[str, Any]:
    """The text generated so far (KoboldAI Lite polls this instead of streaming)."""
    body = await _optional_body(request)
    service = registry_of(request).default.service
    return {"results": [{"text": service.progress(body.genkey) if service else ""}]}


@router.post("/api/extra/abort")
async def abort(request: Request) -> dict[str, str]:
    body = await _optional_body(request)
    n = sum(e.service.abort(body.genkey) for e in registry_of(request).loaded() if e.service)
    return {"success": "true" if n else "false", "done": "true"}


@router.post("/api/extra/tokencount")
async def tokencount(request: Request, body: TokenCountBody) -> dict[str, Any]:
    ids = await _count(request, body.prompt, add_special=False)
    return {"value": len(ids), "ids": ids}


@router.get("/api/extra/version")
async def extra_version(request: Request) -> dict[str, Any]:
    return {
        "result": "KoboldCpp",
        "version": KOBOLDCPP_COMPAT_VERSION,
        "server": "innkeeper",
        "innkeeper": __version__,
        "protected": bool(request.app.state.config.api_keys),
        "txt2img": False,
        "vision": registry_of(request).default.mmproj is not None,
        "transcribe": False,
        "multiplayer": False,
    }


@router.get("/api/extra/true_max_context_length")
async def true_max_context_length(request: Request) -> dict[str, int]:
    return {"value": await registry_of(request).context_size()}


@router.get("/api/extra/perf")
async def perf(request: Request, model: str | None = None) -> dict[str, Any]:
    """KoboldCpp's counters for the default model, or the one `?model=` names (a model that
    is not loaded reports idle, without loading it)."""
    registry = registry_of(request)
    entry = registry.resolve(model)
    service = entry.service
    if service is None:
        return {"model": entry.id, "status": entry.status, "idle": 1, "queue": 0, "total_gens": 0}
    stats = service.stats()
    p = stats.perf
    idle = stats.busy_slots == 0 and stats.queued == 0
    now = time.time()
    return {
        "model": entry.id,
        "status": entry.status,
        "last_process": round(p.last_prompt_seconds, 4),
        "last_eval": round(p.last_eval_seconds, 4),
        "last_token_count": p.last_token_count,
        "last_input_count": p.last_input_count,
        "last_seed": p.last_seed,
        "total_gens": p.total_requests,
        "stop_reason": p.last_stop_reason,
        "queue": stats.queued,
        "idle": 1 if idle else 0,
        "uptime": round(now - p.started, 1),
        "idletime": round(now - p.idle_since, 1) if idle else 0.0,
        "total_img_gens": 0,
        "hordeexitcounter": 0,
        "quiet": False,
        "last_tokens_per_second": round(p.last_tokens_per_second, 2),
        "busy_slots": stats.busy_slots,
        "total_slots": stats.slots,
        "total_prompt_tokens": p.total_prompt_tokens,
        "total_cached_tokens": p.total_cached_tokens,
        "total_generated_tokens": p.total_generated_tokens,
        "total_aborted": p.total_aborted,
    }

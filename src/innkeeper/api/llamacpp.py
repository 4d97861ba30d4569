"""llama.cpp server routes that newer SillyTavern and llama.cpp clients read.

Generation (/completion, /infill) lives in llamacpp_completion.py and the slot routes in
llamacpp_slots.py; their routers are included in this one, which the app registers.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from innkeeper import __version__
from innkeeper.api import llamacpp_completion, llamacpp_slots
from innkeeper.api.admin import caller_of
from innkeeper.api.errors import ApiError
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.openai import ChatBody, render_chat
from innkeeper.api.params import JsonBody, ParamError, normalise
from innkeeper.api.state import registry_of, use_model
from innkeeper.api.status import health_report

router = APIRouter(tags=["llama.cpp"], route_class=OffLoopBodyRoute)
router.include_router(llamacpp_completion.router)
router.include_router(llamacpp_slots.router)


class TokenizeBody(JsonBody):
    model: str | None = None
    content: str = ""
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(JsonBody):
    model: str | None = None
    tokens: list[int]


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return health_report(request)


@router.get("/props")
async def props(request: Request, model: str | None = None) -> dict[str, Any]:
    """The default model's properties, or those of the model `?model=` names. A status read:
    it never loads a model (a page's `<img src=…/props?model=x>` must not swap models); one
    that is not loaded reports what a load would give it."""
    registry = registry_of(request)
    entry = registry.entry_for(model)
    service = entry.service if entry.ready else None
    if service is None:
        settings = await registry.off_loop(lambda: registry.settings_of(entry))
        n_ctx = int(settings["ctx_size"] or 0)
        path, model_id, slots = entry.path, entry.id, settings["parallel"]
        template: dict[str, Any] = {}
    else:
        settings = service.settings
        n_ctx, path, model_id = service.n_ctx, service.info.path, service.model_id
        slots = service.stats().slots
        template = {
            "chat_template": service.template.source or "",
            "chat_template_name": service.template.name,
            "bos_token": service.info.bos_token,
            "eos_token": service.info.eos_token,
            "n_threads": settings["threads"],
        }
    max_tokens = request.app.state.config.default_max_tokens
    return {
        "default_generation_settings": {"n_ctx": n_ctx, "params": {"n_predict": max_tokens or -1}},
        "n_ctx": n_ctx,
        "total_slots": slots,
        "model_path": str(path) if caller_of(request).admin else path.name,
        "model_alias": model_id,
        "status": entry.status,
        **template,
        "build_info": f"innkeeper {__version__}",
        "modalities": {
            "vision": service.vision if service is not None else entry.mmproj is not None,
            "audio": False,
        },
        "n_gpu_layers": settings["gpu_layers"],
        "flash_attn": settings["flash_attn"],
        "cache_type_k": settings["cache_type_k"],
        "cache_type_v": settings["cache_type_v"],
    }


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeBody) -> dict[str, Any]:
    service = await use_model(request, body.model)

    def work(cancel: threading.Event) -> JSONResponse:
        # The answer is built and serialised here too: it grows with the text.
        ids = service.tokenize_now(body.content, body.add_special, cancel=cancel)
        if body.with_pieces:
            pieces = [{"id": t, "piece": service.piece(t)} for t in ids]
            return JSONResponse({"tokens": pieces})
        return JSONResponse({"tokens": ids})

    try:
        return await service.off_loop(work, request)  # type: ignore[return-value]
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeBody) -> dict[str, str]:
    try:
        service = await use_model(request, body.model)
        return {"content": await service.detokenize(body.tokens, request)}
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc


@router.post("/apply-template")
async def apply_template(request: Request, body: ChatBody) -> dict[str, str]:
    """The prompt a chat would send, rendered with the model's template (no generation)."""
    service = await use_model(request, body.model)
    # the body /v1/chat/completions takes: the same checks, though nothing is generated
    service.check_lengths(normalise(body, n_vocab=service.n_vocab))

    def work(_cancel: threading.Event) -> dict[str, str]:
        return {"prompt": render_chat(service, body)[0]}

    return await service.off_loop(work, request)

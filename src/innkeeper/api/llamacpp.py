"""llama.cpp server routes that newer SillyTavern and llama.cpp clients read."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from innkeeper import __version__
from innkeeper.api.errors import ApiError
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.params import JsonBody, ParamError
from innkeeper.api.state import service_of

router = APIRouter(tags=["llama.cpp"], route_class=OffLoopBodyRoute)


class TokenizeBody(JsonBody):
    content: str = ""
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(JsonBody):
    tokens: list[int]


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/props")
async def props(request: Request) -> dict[str, Any]:
    service = service_of(request)
    engine = service.engine
    cfg = engine.config
    return {
        "default_generation_settings": {
            "n_ctx": service.n_ctx,
            "params": {"n_predict": service.default_max_tokens or -1},
        },
        "n_ctx": service.n_ctx,
        "total_slots": len(engine.scheduler.slots),
        "model_path": str(engine.info.path),
        "model_alias": service.model_id,
        "chat_template": engine.template.source or "",
        "chat_template_name": engine.template.name,
        "bos_token": engine.info.bos_token,
        "eos_token": engine.info.eos_token,
        "build_info": f"innkeeper {__version__}",
        "modalities": {"vision": False, "audio": False},
        "n_threads": engine.ctx.threads,
        "n_gpu_layers": cfg.gpu_layers,
        "flash_attn": cfg.flash_attn,
        "cache_type_k": cfg.cache_type_k,
        "cache_type_v": cfg.cache_type_v,
    }


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeBody) -> dict[str, Any]:
    service = service_of(request)
    model = service.engine.model

    def work(cancel: threading.Event) -> JSONResponse:
        # The answer is built and serialised here too: it grows with the text.
        ids = service.tokenize_now(body.content, body.add_special, cancel=cancel)
        if body.with_pieces:
            pieces = [{"id": t, "piece": model.piece(t).decode("utf-8", "replace")} for t in ids]
            return JSONResponse({"tokens": pieces})
        return JSONResponse({"tokens": ids})

    try:
        return await service.off_loop(work, request)  # type: ignore[return-value]
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeBody) -> dict[str, str]:
    try:
        return {"content": await service_of(request).detokenize(body.tokens, request)}
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc

"""llama.cpp server routes that newer SillyTavern and llama.cpp clients read."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from innkeeper import __version__
from innkeeper.api.errors import ApiError
from innkeeper.api.params import ParamError
from innkeeper.api.state import service_of

router = APIRouter(tags=["llama.cpp"])


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str = ""
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
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
    ids = service.tokenize(body.content, add_special=body.add_special)
    if body.with_pieces:
        model = service.engine.model
        return {
            "tokens": [{"id": t, "piece": model.piece(t).decode("utf-8", "replace")} for t in ids]
        }
    return {"tokens": ids}


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeBody) -> dict[str, str]:
    try:
        return {"content": service_of(request).detokenize(body.tokens)}
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc

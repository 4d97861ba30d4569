"""text-generation-webui's internal routes (/v1/internal/*).

SillyTavern's Default (Oobabooga) type asks /v1/internal/model/info on Connect; a 200 turns
on remote token counting through /v1/internal/encode.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from innkeeper.api.errors import ApiError
from innkeeper.api.openai import ChatBody, render_chat
from innkeeper.api.params import ParamError
from innkeeper.api.state import service_of
from innkeeper.engine.templates import BUILTIN_FORMATS

router = APIRouter(tags=["text-generation-webui"])


class EncodeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = ""
    add_special: bool = False


class DecodeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


@router.get("/v1/internal/model/info")
async def model_info(request: Request) -> dict[str, Any]:
    return {"model_name": service_of(request).model_id, "lora_names": [], "loader": "llama.cpp"}


@router.get("/v1/internal/model/list")
async def model_list(request: Request) -> dict[str, Any]:
    return {"model_names": [service_of(request).model_id]}


@router.get("/v1/internal/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/v1/internal/encode")
async def encode(request: Request, body: EncodeBody) -> dict[str, Any]:
    tokens = service_of(request).tokenize(body.text, add_special=body.add_special)
    return {"tokens": tokens, "length": len(tokens)}


@router.post("/v1/internal/decode")
async def decode(request: Request, body: DecodeBody) -> dict[str, str]:
    try:
        return {"text": service_of(request).detokenize(body.tokens)}
    except ParamError as exc:
        raise ApiError(422, str(exc)) from exc


@router.post("/v1/internal/token-count")
async def token_count(request: Request, body: EncodeBody) -> dict[str, int]:
    return {"length": len(service_of(request).tokenize(body.text, add_special=body.add_special))}


@router.post("/v1/internal/stop-generation")
async def stop_generation(request: Request) -> PlainTextResponse:
    service_of(request).abort()
    return PlainTextResponse('"OK"', media_type="application/json")


@router.post("/v1/internal/chat-prompt")
async def chat_prompt(request: Request, body: ChatBody) -> dict[str, Any]:
    """The prompt a chat request would send, rendered with the chosen template."""
    service = service_of(request)
    prompt, stops = render_chat(service, body)
    return {"prompt": prompt, "stop": list(stops), "tokens": len(service.tokenize(prompt))}


@router.get("/v1/internal/templates")
async def templates(request: Request) -> dict[str, Any]:
    """The instruct formats the server can render (the web page lists them)."""
    current = service_of(request).engine.template
    return {
        "model": current.name,
        "has_model_template": current.source is not None,
        "builtin": [{"name": f.name, "label": f.label} for f in BUILTIN_FORMATS.values()],
    }

"""text-generation-webui's internal routes (/v1/internal/*).

SillyTavern's Default (Oobabooga) type asks /v1/internal/model/info on Connect; a 200 turns
on remote token counting through /v1/internal/encode.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from innkeeper.api.errors import ApiError
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.openai import ChatBody, render_chat
from innkeeper.api.params import JsonBody, ParamError, normalise
from innkeeper.api.state import registry_of, use_model
from innkeeper.api.status import health_report
from innkeeper.engine.templates import BUILTIN_FORMATS

router = APIRouter(tags=["text-generation-webui"], route_class=OffLoopBodyRoute)


class EncodeBody(JsonBody):
    text: str = ""
    add_special: bool = False


class DecodeBody(JsonBody):
    tokens: list[int]


@router.get("/v1/internal/model/info")
async def model_info(request: Request) -> dict[str, Any]:
    """The current default model: what requests that name no model go to."""
    default = registry_of(request).default
    return {
        "model_name": default.id,
        "lora_names": [],
        "loader": "llama.cpp",
        "status": default.status,
    }


@router.get("/v1/internal/model/list")
async def model_list(request: Request) -> dict[str, Any]:
    return {"model_names": [e.id for e in registry_of(request).entries()]}


@router.get("/v1/internal/health")
async def health(request: Request) -> dict[str, Any]:
    return health_report(request)


async def _count(request: Request, text: str, add_special: bool) -> list[int]:
    """Token ids for an encode/count route (off the event loop; too long a text is a 422)."""
    try:
        service = await use_model(request)
        return await service.tokenize(text, add_special, request=request)
    except ParamError as exc:
        raise ApiError(422, str(exc)) from exc


@router.post("/v1/internal/encode")
async def encode(request: Request, body: EncodeBody) -> dict[str, Any]:
    tokens = await _count(request, body.text, body.add_special)
    return {"tokens": tokens, "length": len(tokens)}


@router.post("/v1/internal/decode")
async def decode(request: Request, body: DecodeBody) -> dict[str, str]:
    try:
        return {"text": await (await use_model(request)).detokenize(body.tokens, request)}
    except ParamError as exc:
        raise ApiError(422, str(exc)) from exc


@router.post("/v1/internal/token-count")
async def token_count(request: Request, body: EncodeBody) -> dict[str, int]:
    return {"length": len(await _count(request, body.text, body.add_special))}


@router.post("/v1/internal/stop-generation")
async def stop_generation(request: Request) -> PlainTextResponse:
    for e in registry_of(request).loaded():
        if e.service is not None:
            e.service.abort()
    return PlainTextResponse('"OK"', media_type="application/json")


@router.post("/v1/internal/chat-prompt")
async def chat_prompt(request: Request, body: ChatBody) -> dict[str, Any]:
    """The prompt a chat request would send, rendered with the chosen template."""
    service = await use_model(request, body.model)
    try:  # the same body /v1/chat/completions takes: the same checks
        service.check_lengths(normalise(body, n_vocab=service.n_vocab))
    except ParamError as exc:
        raise ApiError(422, str(exc)) from exc

    def work(cancel: threading.Event) -> dict[str, Any]:
        prompt, stops = render_chat(service, body)
        n = len(service.tokenize_now(prompt, cancel=cancel))
        return {"prompt": prompt, "stop": list(stops), "tokens": n}

    try:  # rendering and tokenising grow with the body: off the event loop
        return await service.off_loop(work, request)
    except ParamError as exc:
        raise ApiError(422, str(exc)) from exc


@router.get("/v1/internal/templates")
async def templates(request: Request) -> dict[str, Any]:
    """The instruct formats the server can render (the web page lists them)."""
    service = registry_of(request).default.service  # a status read: never loads a model
    current = service.template if service is not None else None
    return {
        "model": current.name if current is not None else None,
        "has_model_template": current is not None and current.source is not None,
        "builtin": [{"name": f.name, "label": f.label} for f in BUILTIN_FORMATS.values()],
    }

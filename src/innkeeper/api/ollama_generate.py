"""Ollama's generation routes: /api/generate and /api/chat, streamed as NDJSON by default.

`options` are the sampler settings every family sends, under Ollama's names, which are among
`SamplerFields`' spellings: one `normalise` for all. Prompts are rendered with the model's chat
template by /v1/chat/completions' own `render_chat` (`raw` skips it, as in Ollama). An empty
prompt (or no messages) is Ollama's load request: the model is loaded, nothing is generated,
and with `keep_alive: 0` an admin unloads it instead. `keep_alive` and `num_ctx` (a reload
with that context) pass through the admin rule: without the admin key they never unload,
load or reload a model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field

from innkeeper.api import images
from innkeeper.api.admin import caller_of
from innkeeper.api.errors import ApiError, check_finish, finish_error
from innkeeper.api.ollama_models import OllamaRoute, now_iso, resolve
from innkeeper.api.openai import ChatBody, render_chat
from innkeeper.api.params import JsonBody, SamplerFields, normalise
from innkeeper.api.state import registry_of, use_model
from innkeeper.api.streaming import ChunkTemplate, json_str, ndjson_line, ndjson_response, slot
from innkeeper.engine.events import Event, FinishEvent, TokenEvent
from innkeeper.engine.vision import MediaPrompt
from innkeeper.serving.catalog import ModelEntry
from innkeeper.serving.errors import ParamError
from innkeeper.serving.generation import Generation
from innkeeper.serving.load_settings import KEEP_ALIVE_PATTERN, parse_keep_alive
from innkeeper.serving.service import Service

log = logging.getLogger("innkeeper.api.ollama")

router = APIRouter(tags=["Ollama"], route_class=OllamaRoute)

# Ollama's `format: "json"`: llama.cpp's grammars/json.gbnf, whose root is an object.
JSON_GRAMMAR = r"""root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""
NS = 1_000_000_000

KeepAlive = float | Annotated[str, Field(pattern=KEEP_ALIVE_PATTERN)] | None


class OllamaOptions(SamplerFields):
    """Ollama's `options`: its sampler names are SamplerFields' own; of its load options only
    num_ctx is used (num_gpu, num_thread, num_batch… are the server's, and ignored, as are
    names Ollama does not know)."""

    num_ctx: Annotated[int, Field(ge=1)] | None = None


class _OllamaBody(JsonBody):
    model: str
    format: str | dict[str, Any] | None = Field(
        None, description='"json", or a JSON schema (not supported yet: a 400)'
    )
    options: OllamaOptions | None = None
    stream: bool = True
    keep_alive: KeepAlive = Field(
        None, description="seconds or a duration like 5m; 0 unloads (admin only)"
    )


class GenerateBody(_OllamaBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = Field(
        None, description="a built-in template name (chatml, alpaca…); Go templates are refused"
    )
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaMessage(JsonBody):
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


class OllamaChatBody(_OllamaBody):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None


def format_grammar(fmt: str | dict[str, Any] | None) -> str | None:
    """The grammar for Ollama's `format`; a JSON schema is a 400 (innkeeper has no schema to
    grammar converter yet)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return JSON_GRAMMAR
    if isinstance(fmt, dict):
        raise ApiError(
            400,
            'format: JSON schemas are not supported by this server; send "format": "json" '
            "for any JSON object",
        )
    raise ApiError(400, f'format must be "json" or a JSON schema (got {fmt[:100]!r})')


def generation(service: Service, body: _OllamaBody) -> Generation:
    """The request's samplers and stops, through the one `normalise` of every family."""
    options = body.options or OllamaOptions()
    if options.num_predict is not None and options.num_predict < 0:
        options = options.model_copy(update={"num_predict": None})  # -1, -2: no limit
    try:
        gen = normalise(options, n_vocab=service.n_vocab)
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc
    grammar = format_grammar(body.format)
    if grammar is not None:
        gen.params.grammar = grammar
    return gen


async def _apply_num_ctx(request: Request, e: ModelEntry, num_ctx: int) -> None:
    """Reload the model with `num_ctx` as its context, as Ollama does: an admin action, so
    for anyone else the model keeps its context (and is not loaded by this)."""
    registry = registry_of(request)
    if e.service is not None and e.service.n_ctx == num_ctx:
        return
    caller = caller_of(request)
    if not caller.admin or (e.service is None and not registry.config.autoload):
        log.info("ignoring num_ctx %d for %s: not an admin, or no autoload", num_ctx, e.id)
        return
    await registry.load(e.id, {**e.overrides, "ctx_size": num_ctx}, caller=caller)


async def _service(request: Request, body: _OllamaBody) -> tuple[Service, float]:
    """The model the request names, loaded (if the caller may), and the seconds that took."""
    if not body.model.strip():
        raise ApiError(400, "model is required")
    e = resolve(registry_of(request), body.model)
    t0 = time.monotonic()
    if body.options is not None and body.options.num_ctx is not None:
        await _apply_num_ctx(request, e, body.options.num_ctx)
    service = await use_model(request, e.id, body.keep_alive)
    return service, time.monotonic() - t0


async def _load_only(
    request: Request, body: _OllamaBody, shape: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """Ollama's empty request: load the model (or unload it, keep_alive 0, for an admin)."""
    if not body.model.strip():
        raise ApiError(400, "model is required")
    registry = registry_of(request)
    e = resolve(registry, body.model)
    caller = caller_of(request)
    if parse_keep_alive(body.keep_alive) == 0 and caller.admin:
        await registry.unload(e.id, caller=caller)
        reason = "unload"
    else:
        await _service(request, body)
        reason = "load"
    return {
        "model": body.model,
        "created_at": now_iso(),
        **shape(""),
        "done": True,
        "done_reason": reason,
    }


def _durations(ev: FinishEvent, started: float, load_s: float) -> dict[str, Any]:
    """Ollama's counters, durations in nanoseconds."""
    t = ev.timings
    return {
        "total_duration": int((time.monotonic() - started) * NS),
        "load_duration": int(load_s * NS),
        "prompt_eval_count": t.prompt_tokens,
        "prompt_eval_duration": int(t.prompt_ms * NS / 1000),
        "eval_count": t.completion_tokens,
        "eval_duration": int(t.predicted_ms * NS / 1000),
    }


async def _run(
    request: Request,
    body: _OllamaBody,
    render: Callable[[Service], tuple[str, tuple[str, ...], list[bytes]]],
    shape: Callable[[str], dict[str, Any]],
    context: list[int] | None = None,
) -> Any:
    """Render, tokenise (off the loop), start and answer, streamed or whole; `shape` puts
    text where the route's answer carries it (`response`, or `message.content`)."""
    started = time.monotonic()
    service, load_s = await _service(request, body)
    gen = generation(service, body)
    limit = service.prompt_limit(gen)
    image_limits = images.limits_of(request)

    def work(cancel: threading.Event) -> tuple[list[int], tuple[str, ...], MediaPrompt | None]:
        text, stops, raw = render(service)
        head = list(context or [])
        if raw:
            if head:
                raise ParamError("images cannot be combined with a context")
            media = images.media_prompt(service, text, raw, image_limits, limit)
            return media.tokens, stops, media
        tokens = service.tokenize_now(text, not head, limit=limit, cancel=cancel)
        return head + tokens, stops, None

    try:
        prompt, stops, media = await service.off_loop(work, request)
        gen.stop = list(dict.fromkeys([*gen.stop, *(s for s in stops if s)]))
        await service.check_grammar(gen.params.grammar)
        running = service.start(
            prompt, gen, default_max_tokens=service.default_max_tokens, media=media
        )
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc

    def final(ev: FinishEvent, text: str) -> dict[str, Any]:
        return {
            "model": body.model,
            "created_at": now_iso(),
            **shape(text),
            "done": True,
            "done_reason": "length" if ev.reason == "length" else "stop",
            **_durations(ev, started, load_s),
        }

    if body.stream:
        # A token's line: {"model", "created_at", the text as `shape` places it, "done"}.
        token = ChunkTemplate(
            {"model": body.model, "created_at": slot(0), **shape(slot(1)), "done": False},
            before="",
            after="\n",
        )

        def frame(ev: Event) -> bytes:
            if isinstance(ev, TokenEvent):
                return token(json_str(now_iso()), json_str(ev.text)) if ev.text else b""
            if ev.reason == "error":
                return ndjson_line({"error": finish_error(ev).message})
            return ndjson_line(final(ev, ""))

        return ndjson_response(service, running, frame)
    ev = await service.collect(request, running)
    check_finish(ev)
    return final(ev, ev.text)


def _with_images(text: str, b64: list[str] | None) -> tuple[str, list[bytes]]:
    """Ollama's `images` (base64) for a text: `[img-N]` in it places image N, the others
    go before it (a worker thread: the base64 is decoded here)."""
    if not b64:
        return text, []
    return images.tagged_images(text, {i: images.from_data_uri(b) for i, b in enumerate(b64)})


@router.post("/api/generate", include_in_schema=False)
async def generate(request: Request, body: GenerateBody) -> Any:
    """Ollama's completion: `prompt` in the model's chat template (with `system`), or as
    given with `raw` (SillyTavern sends its own formatted prompt raw)."""
    images.check_count(len(body.images or ()), images.limits_of(request))
    if body.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported by this server")
    if body.template and not body.raw and "{{" in body.template:
        raise ApiError(
            400,
            "template: Ollama's Go templates are not supported; name a built-in template "
            "(chatml, alpaca, llama3…) or send the formatted prompt with raw: true",
        )

    def shape(text: str) -> dict[str, Any]:
        return {"response": text}

    if not body.prompt and not body.context:
        return await _load_only(request, body, shape)

    def render(service: Service) -> tuple[str, tuple[str, ...], list[bytes]]:
        prompt, raw = _with_images(body.prompt, body.images)
        if body.raw:
            return prompt, (), raw
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": prompt})
        chat = ChatBody.model_validate({"messages": messages, "chat_template": body.template})
        return (*render_chat(service, chat), raw)

    return await _run(request, body, render, shape, body.context)


@router.post("/api/chat", include_in_schema=False)
async def chat(request: Request, body: OllamaChatBody) -> Any:
    """Ollama's chat: the messages rendered exactly as /v1/chat/completions renders them."""
    if body.tools:
        raise ApiError(400, "tools are not supported by this server")
    n_images = sum(len(m.images or ()) for m in body.messages)
    images.check_count(n_images, images.limits_of(request))

    def shape(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    if not body.messages:
        return await _load_only(request, body, shape)

    def render(service: Service) -> tuple[str, tuple[str, ...], list[bytes]]:
        messages, raw = [], []
        for m in body.messages:
            content, found = _with_images(m.content, m.images)
            messages.append({"role": m.role, "content": content})
            raw += found
        return (*render_chat(service, ChatBody.model_validate({"messages": messages})), raw)

    return await _run(request, body, render, shape)

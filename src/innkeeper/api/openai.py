"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

SillyTavern's KoboldCpp and Default (Oobabooga) Text Completion types both generate through
/v1/completions; chat clients and the `openai` SDK use /v1/chat/completions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from innkeeper.api.errors import ApiError
from innkeeper.api.params import Generation, ParamError, SamplerFields, normalise
from innkeeper.api.service import RunningGeneration, Service, check_finish
from innkeeper.api.state import service_of
from innkeeper.api.streaming import sse, sse_response
from innkeeper.engine.events import Event, FinishEvent, TokenEvent, TokenLogprob
from innkeeper.engine.templates import TemplateRenderError, message_text, template_by_name

router = APIRouter(tags=["OpenAI"])

PromptType = str | list[str] | list[int] | list[list[int]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionBody(SamplerFields):
    model: str | None = None
    prompt: PromptType = ""
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=16)] = 1
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    genkey: str | None = Field(
        None, description="KoboldCpp multi-user key: /api/extra/abort with it stops only this run"
    )


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatBody(SamplerFields):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=16)] = 1
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stream_options: StreamOptions | None = None
    instruction_template: str | None = Field(
        None, description="a built-in instruct format name (alpaca, chatml…) instead of the model's"
    )
    chat_template: str | None = Field(None, description="alias of instruction_template")
    continue_: bool = Field(False, description="continue the last assistant message")
    add_generation_prompt: bool = True
    user: str | None = None
    genkey: str | None = Field(
        None, description="KoboldCpp multi-user key: /api/extra/abort with it stops only this run"
    )


def _finish_reason(ev: FinishEvent) -> str:
    return "length" if ev.reason == "length" else "stop"


def usage(ev: FinishEvent) -> dict[str, Any]:
    t = ev.timings
    return {
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "total_tokens": t.prompt_tokens + t.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": t.cached_tokens},
    }


def timings(ev: FinishEvent) -> dict[str, Any]:
    """llama-server's `timings` object (benchmarks and llama.cpp clients read it)."""
    t = ev.timings
    return {
        "prompt_n": t.evaluated_tokens,
        "prompt_ms": round(t.prompt_ms, 3),
        "prompt_per_second": round(t.prompt_per_second, 3),
        "predicted_n": t.completion_tokens,
        "predicted_ms": round(t.predicted_ms, 3),
        "predicted_per_second": round(t.predicted_per_second, 3),
        "cache_n": t.cached_tokens,
    }


def _prompts(service: Service, prompt: PromptType) -> list[list[int]]:
    if isinstance(prompt, str):
        return [service.tokenize(prompt)]
    if not prompt:
        return [service.tokenize("")]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in prompt):
        return [service.tokenize(p) for p in prompt]  # type: ignore[arg-type]
    return [list(p) for p in prompt]  # type: ignore[arg-type]


def _legacy_logprobs(lps: list[TokenLogprob], offset0: int) -> dict[str, Any]:
    offsets, pos = [], offset0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.text)
    return {
        "tokens": [lp.text for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.text: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _chat_logprobs(lps: Iterable[TokenLogprob]) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(lp.text, lp.logprob),
                "top_logprobs": [entry(t.text, t.logprob) for t in lp.top],
            }
            for lp in lps
        ]
    }


def _generation(service: Service, body: SamplerFields) -> Generation:
    try:
        return normalise(body, n_vocab=service.engine.model.n_vocab)
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc


def _start_all(
    service: Service,
    prompts: list[list[int]],
    body: CompletionBody | ChatBody,
    n: int,
    n_logprobs: int,
) -> list[RunningGeneration]:
    runs: list[RunningGeneration] = []
    try:
        for prompt in prompts:
            for _ in range(n):
                gen = _generation(service, body)
                runs.append(
                    service.start(
                        prompt,
                        gen,
                        default_max_tokens=service.default_max_tokens,
                        n_logprobs=n_logprobs,
                        genkey=body.genkey,
                    )
                )
    except ParamError as exc:
        for r in runs:
            r.cancel()
        raise ApiError(400, str(exc)) from exc
    except BaseException:
        for r in runs:
            r.cancel()
        raise
    return runs


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Always 200 with a `data` list: SillyTavern hangs on anything else."""
    return {"object": "list", "data": [_model_card(service_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    service = service_of(request)
    if model_id != service.model_id:
        raise ApiError(404, f"model {model_id!r} is not loaded", "not_found_error")
    return _model_card(service)


def _model_card(service: Service) -> dict[str, Any]:
    info = service.engine.info
    return {
        "id": service.model_id,
        "object": "model",
        "created": int(service.started),
        "owned_by": "innkeeper",
        "meta": {
            "n_ctx": service.n_ctx,
            "n_ctx_train": info.n_ctx_train,
            "n_params": info.n_params,
            "n_vocab": info.n_vocab,
            "size": info.size_bytes,
        },
    }


@router.post("/v1/completions")
@router.post("/v1/completion", include_in_schema=False)
async def completions(request: Request, body: CompletionBody) -> Any:
    service = service_of(request)
    prompts = _prompts(service, body.prompt)
    if body.stream and (len(prompts) > 1 or body.n > 1):
        raise ApiError(400, "streaming supports a single prompt with n=1")
    n_logprobs = body.logprobs or 0
    runs = _start_all(service, prompts, body, body.n, n_logprobs)
    cid = f"cmpl-{runs[0].id}"
    created = int(time.time())
    model = service.model_id

    if body.stream:
        running = runs[0]
        include_usage = True

        def frame(ev: Event) -> Iterable[bytes]:
            choice: dict[str, Any] = {
                "index": 0,
                "text": "",
                "logprobs": None,
                "finish_reason": None,
            }
            chunk: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if isinstance(ev, TokenEvent):
                if not ev.text and not (n_logprobs and ev.logprobs):
                    return
                choice["text"] = ev.text
                if n_logprobs and ev.logprobs:
                    choice["logprobs"] = _legacy_logprobs(list(ev.logprobs), 0)
                yield sse(chunk)
                return
            if ev.reason == "error":
                yield sse(
                    {"error": {"message": ev.error or "generation failed", "type": "server_error"}}
                )
                return
            choice["finish_reason"] = _finish_reason(ev)
            if include_usage:
                chunk["usage"] = usage(ev)
            chunk["timings"] = timings(ev)
            yield sse(chunk)

        return sse_response(service, running, frame)

    finals = await asyncio.gather(*(service.collect(request, r) for r in runs))
    choices = []
    total_prompt = total_completion = 0
    for i, (running, ev) in enumerate(zip(runs, finals, strict=True)):
        check_finish(ev)
        prompt_text = ""
        if body.echo:
            prompt_text = service.engine.detokenize(running.request.prompt)
        choice: dict[str, Any] = {
            "index": i,
            "text": prompt_text + ev.text,
            "logprobs": _legacy_logprobs(running.logprobs, len(prompt_text))
            if n_logprobs
            else None,
            "finish_reason": _finish_reason(ev),
        }
        choices.append(choice)
        if i % body.n == 0:
            total_prompt += ev.timings.prompt_tokens
        total_completion += ev.timings.completion_tokens
    last = finals[-1]
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": total_prompt,
            "completion_tokens": total_completion,
            "total_tokens": total_prompt + total_completion,
            "prompt_tokens_details": {"cached_tokens": last.timings.cached_tokens},
        },
        "timings": timings(last),
        "system_fingerprint": f"innkeeper-seed-{last.seed}",
    }


def render_chat(service: Service, body: ChatBody) -> tuple[str, tuple[str, ...]]:
    """The prompt text for a chat request and its template's stop strings.

    To continue the last assistant message, the earlier messages are rendered up to the
    assistant's turn and its text is appended unfinished: Jinja templates close every turn
    they render, so rendering the message itself would start a new one.
    """
    try:
        template = template_by_name(
            body.instruction_template or body.chat_template, service.engine.template
        )
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        if body.continue_ and messages[-1].get("role") == "assistant":
            head = template.render(messages[:-1], add_generation_prompt=True)
            return head + message_text(messages[-1].get("content")), template.stop
        return template.render(
            messages, add_generation_prompt=body.add_generation_prompt
        ), template.stop
    except (TemplateRenderError, ValueError) as exc:
        raise ApiError(400, str(exc)) from exc


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatBody) -> Any:
    service = service_of(request)
    prompt_text, template_stops = render_chat(service, body)
    prompt = service.tokenize(prompt_text)
    if body.stream and body.n > 1:
        raise ApiError(400, "streaming supports n=1")
    n_logprobs = (body.top_logprobs or 1) if body.logprobs else 0
    extra_stops = [s for s in template_stops if s]
    if extra_stops:
        stops = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
        body = body.model_copy(update={"stop": list(dict.fromkeys(stops + extra_stops))})
    runs = _start_all(service, [prompt], body, body.n, n_logprobs)
    cid = f"chatcmpl-{runs[0].id}"
    created = int(time.time())
    model = service.model_id

    if body.stream:
        running = runs[0]
        sent_role = False
        include_usage = True

        def frame(ev: Event) -> Iterable[bytes]:
            nonlocal sent_role
            base: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            if not sent_role:
                sent_role = True
                yield sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            if isinstance(ev, TokenEvent):
                if not ev.text and not (n_logprobs and ev.logprobs):
                    return
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": ev.text},
                    "logprobs": None,
                    "finish_reason": None,
                }
                if n_logprobs and ev.logprobs:
                    choice["logprobs"] = _chat_logprobs(ev.logprobs)
                yield sse({**base, "choices": [choice]})
                return
            if ev.reason == "error":
                yield sse(
                    {"error": {"message": ev.error or "generation failed", "type": "server_error"}}
                )
                return
            final: dict[str, Any] = {
                **base,
                "choices": [
                    {"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(ev)}
                ],
                "timings": timings(ev),
            }
            if include_usage:
                final["usage"] = usage(ev)
            yield sse(final)

        return sse_response(service, running, frame)

    finals = await asyncio.gather(*(service.collect(request, r) for r in runs))
    choices = []
    for i, (running, ev) in enumerate(zip(runs, finals, strict=True)):
        check_finish(ev)
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": ev.text},
                "logprobs": _chat_logprobs(running.logprobs) if n_logprobs else None,
                "finish_reason": _finish_reason(ev),
            }
        )
    last = finals[-1]
    completion = sum(ev.timings.completion_tokens for ev in finals)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": last.timings.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": last.timings.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": last.timings.cached_tokens},
        },
        "timings": timings(last),
        "system_fingerprint": f"innkeeper-seed-{last.seed}",
    }

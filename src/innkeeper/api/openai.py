"""OpenAI-compatible generation routes: /v1/completions, /v1/chat/completions.

SillyTavern's KoboldCpp and Default (Oobabooga) Text Completion types both generate through
/v1/completions; chat clients and the `openai` SDK use /v1/chat/completions. The model list
(/v1/models) is in openai_models.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field

from innkeeper.api import images
from innkeeper.api.admin import caller_of
from innkeeper.api.errors import ApiError, check_finish, finish_error
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.params import Generation, JsonBody, ParamError, SamplerFields, normalise
from innkeeper.api.state import registry_of, use_model
from innkeeper.api.store_routes import jobs_of
from innkeeper.api.streaming import ChunkTemplate, json_str, slot, sse, sse_runs_response
from innkeeper.engine.events import Event, FinishEvent, TokenEvent, TokenLogprob
from innkeeper.engine.templates import TemplateRenderError, message_text, template_by_name
from innkeeper.engine.vision import MediaPrompt
from innkeeper.serving.generation import RunningGeneration
from innkeeper.serving.load_settings import KEEP_ALIVE_PATTERN
from innkeeper.serving.service import Service
from innkeeper.serving.store_jobs import autopull

router = APIRouter(tags=["OpenAI"], route_class=OffLoopBodyRoute)

PromptType = str | list[str] | list[int] | list[list[int]]


class StreamOptions(JsonBody):
    include_usage: bool = False


class OpenAIFields(SamplerFields):
    """What both OpenAI routes take besides samplers (and Ollama's/KoboldCpp's extras)."""

    model: str | None = None
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream_options: StreamOptions | None = None
    user: str | None = None
    keep_alive: float | Annotated[str, Field(pattern=KEEP_ALIVE_PATTERN)] | None = Field(
        None,
        description="Ollama's keep_alive: seconds or a duration like 5m to keep the model "
        "loaded after this request (negative: forever; shortening it needs the admin key)",
    )
    genkey: str | None = Field(
        None, description="KoboldCpp multi-user key: /api/extra/abort with it stops only this run"
    )


class CompletionBody(OpenAIFields):
    prompt: PromptType = ""
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None


class ChatMessage(JsonBody):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatBody(OpenAIFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    instruction_template: str | None = Field(
        None, description="a built-in instruct format name (alpaca, chatml…) instead of the model's"
    )
    chat_template: str | None = Field(None, description="alias of instruction_template")
    continue_: bool = Field(False, description="continue the last assistant message")
    add_generation_prompt: bool = True


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


async def _prompts(
    service: Service, prompt: PromptType, gen: Generation, request: Request
) -> list[list[int]]:
    """The prompt(s) as token ids, tokenised off the event loop (one job for all of them)."""
    if isinstance(prompt, str) or not prompt:
        texts = [prompt or ""]
    elif all(isinstance(p, str) for p in prompt):
        texts = list(prompt)  # type: ignore[arg-type]
    elif all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    else:
        return [list(p) for p in prompt]  # type: ignore[arg-type]
    limit = service.prompt_limit(gen)

    def work(cancel: threading.Event) -> list[list[int]]:
        return [service.tokenize_now(t, limit=limit, cancel=cancel) for t in texts]  # type: ignore[arg-type]

    try:
        return await service.off_loop(work, request)
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc


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


def _text_choice(i: int, text: str) -> dict[str, Any]:
    return {"index": i, "text": text, "logprobs": None, "finish_reason": None}


def _delta_choice(i: int, text: str) -> dict[str, Any]:
    return {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}


class _Stream:
    """OpenAI's streaming shape for `n` choices: chunks carry each choice's `index`; with
    `stream_options.include_usage` every chunk has `usage: null` and one last chunk with
    `choices: []` carries the usage of all choices; without it no chunk has a usage.
    `choice(index, text)` is a token's choice (completions' or chat's)."""

    def __init__(
        self,
        cid: str,
        kind: str,
        created: int,
        model: str,
        options: StreamOptions | None,
        n: int,
        choice: Callable[[int, str], dict[str, Any]],
    ) -> None:
        self.base = {"id": cid, "object": kind, "created": created, "model": model}
        self.include_usage = bool(options and options.include_usage)
        self.n = n
        self.choice = choice
        self.finals: dict[int, FinishEvent] = {}
        self._templates: dict[int, ChunkTemplate] = {}

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {**self.base, "choices": choices, **extra}
        if self.include_usage:
            body["usage"] = None
        return body

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse(self.body(choices, **extra))

    def text(self, i: int, text: str) -> bytes:
        """A token's chunk, the same bytes as `chunk([choice(i, text)])`: the rest of it is
        encoded once per choice, each token only escapes its text."""
        template = self._templates.get(i)
        if template is None:
            template = ChunkTemplate(self.body([self.choice(i, slot(0))]))
            self._templates[i] = template
        return template(json_str(text))

    def error(self, ev: FinishEvent) -> bytes:
        err = finish_error(ev)  # the type of the error kind (a refused grammar is the client's)
        return sse({"error": {"message": err.message, "type": err.type}})

    def usage_chunk(self) -> Iterable[bytes]:
        if not self.include_usage or not self.finals:
            return
        finals = sorted(self.finals.items())
        per_prompt = {i // self.n: ev.timings for i, ev in finals}
        prompt = sum(t.prompt_tokens for t in per_prompt.values())
        completion = sum(ev.timings.completion_tokens for _, ev in finals)
        yield sse(
            {
                **self.base,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": {
                        "cached_tokens": sum(t.cached_tokens for t in per_prompt.values())
                    },
                },
            }
        )


async def _check_grammar(service: Service, gen: Generation) -> None:
    """Bound and compile the request's grammar off the event loop, before any run starts."""
    try:
        await service.check_grammar(gen.params.grammar)
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc


def _generation(service: Service, body: SamplerFields) -> Generation:
    try:
        return normalise(body, n_vocab=service.n_vocab)
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc


def _start_all(
    service: Service,
    prompts: list[list[int]],
    body: CompletionBody | ChatBody,
    n: int,
    n_logprobs: int,
    media: MediaPrompt | None = None,
) -> list[RunningGeneration]:
    """Start `n` runs per prompt, all or none: every prompt is checked before the first run
    is queued, and if any start fails (queue full, bad grammar) the runs already started
    are cancelled and forgotten, so a failed request leaves nothing behind."""
    runs: list[RunningGeneration] = []
    complete = False
    try:
        gens = [_generation(service, body) for _ in range(len(prompts) * n)]
        for prompt, gen in zip(prompts, gens[::n], strict=True):
            service.prepare(prompt, gen, service.default_max_tokens, media)
        for i, gen in enumerate(gens):
            runs.append(
                service.start(
                    prompts[i // n],
                    gen,
                    default_max_tokens=service.default_max_tokens,
                    n_logprobs=n_logprobs,
                    genkey=body.genkey,
                    media=media,
                )
            )
        complete = True
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc
    finally:
        if not complete:
            service.release(runs)
    return runs


async def _pulled(request: Request, name: str | None) -> str | None:
    """The model to serve: an unpulled `owner/repo[:QUANT]` is pulled first (an admin action,
    with autoload on), the rest is the registry's (serving/store_jobs.autopull)."""
    pulled = await autopull(registry_of(request), jobs_of(request), name, caller_of(request))
    return pulled or name


@router.post("/v1/completions")
@router.post("/v1/completion", include_in_schema=False)
async def completions(request: Request, body: CompletionBody) -> Any:
    service = await use_model(request, await _pulled(request, body.model), body.keep_alive)
    gen = _generation(service, body)
    prompts = await _prompts(service, body.prompt, gen, request)
    await _check_grammar(service, gen)
    n_logprobs = body.logprobs or 0
    runs = _start_all(service, prompts, body, body.n, n_logprobs)
    cid = f"cmpl-{runs[0].id}"
    created = int(time.time())
    model = service.model_id

    if body.stream:
        stream = _Stream(
            cid, "text_completion", created, model, body.stream_options, body.n, _text_choice
        )

        def frame(i: int, ev: Event) -> bytes:
            if isinstance(ev, TokenEvent):
                if n_logprobs and ev.logprobs:
                    choice = _text_choice(i, ev.text)
                    choice["logprobs"] = _legacy_logprobs(list(ev.logprobs), 0)
                    return stream.chunk([choice])
                return stream.text(i, ev.text) if ev.text else b""
            if ev.reason == "error":
                return stream.error(ev)
            stream.finals[i] = ev
            choice = {"index": i, "text": "", "logprobs": None, "finish_reason": _finish_reason(ev)}
            return stream.chunk([choice], timings=timings(ev))

        return sse_runs_response(service, runs, frame, end=stream.usage_chunk)

    finals = await asyncio.gather(*(service.collect(request, r) for r in runs))
    choices = []
    total_prompt = total_completion = 0
    for i, (running, ev) in enumerate(zip(runs, finals, strict=True)):
        check_finish(ev)
        prompt_text = ""
        if body.echo:
            prompt_text = service.detokenize_now(running.request.prompt)
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


def render_chat(
    service: Service, body: ChatBody, messages: list[dict[str, Any]] | None = None
) -> tuple[str, tuple[str, ...]]:
    """The prompt text for a chat request and its template's stop strings.

    To continue the last assistant message, the earlier messages are rendered up to the
    assistant's turn and its text is appended unfinished: Jinja templates close every turn
    they render, so rendering the message itself would start a new one.
    """
    try:
        template = template_by_name(
            body.instruction_template or body.chat_template, service.template
        )
        if messages is None:
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
    service = await use_model(request, await _pulled(request, body.model), body.keep_alive)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true")
    gen = _generation(service, body)
    limit = service.prompt_limit(gen)

    image_limits = images.limits_of(request)

    def work(
        cancel: threading.Event,
    ) -> tuple[list[int], tuple[str, ...], MediaPrompt | None]:
        messages, raw = images.chat_images([m.model_dump(exclude_none=True) for m in body.messages])
        text, stops = render_chat(service, body, messages)
        if not raw:
            return service.tokenize_now(text, limit=limit, cancel=cancel), stops, None
        media = images.media_prompt(service, text, raw, image_limits, limit)
        return media.tokens, stops, media

    try:  # template, images and tokeniser run off the event loop: all grow with the body
        prompt, template_stops, media = await service.off_loop(work, request)
    except ParamError as exc:
        raise ApiError(400, str(exc)) from exc
    await _check_grammar(service, gen)
    n_logprobs = (body.top_logprobs or 1) if body.logprobs else 0
    extra_stops = [s for s in template_stops if s]
    if extra_stops:
        stops = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
        body = body.model_copy(update={"stop": list(dict.fromkeys(stops + extra_stops))})
    runs = _start_all(service, [prompt], body, body.n, n_logprobs, media)
    cid = f"chatcmpl-{runs[0].id}"
    created = int(time.time())
    model = service.model_id

    if body.stream:
        stream = _Stream(
            cid, "chat.completion.chunk", created, model, body.stream_options, body.n, _delta_choice
        )
        head = [
            stream.chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(len(runs))
        ]

        def frame(i: int, ev: Event) -> bytes:
            if isinstance(ev, TokenEvent):
                if n_logprobs and ev.logprobs:
                    choice = _delta_choice(i, ev.text)
                    choice["logprobs"] = _chat_logprobs(ev.logprobs)
                    return stream.chunk([choice])
                return stream.text(i, ev.text) if ev.text else b""
            if ev.reason == "error":
                return stream.error(ev)
            stream.finals[i] = ev
            choice = {
                "index": i,
                "delta": {},
                "logprobs": None,
                "finish_reason": _finish_reason(ev),
            }
            return stream.chunk([choice], timings=timings(ev))

        return sse_runs_response(service, runs, frame, head=head, end=stream.usage_chunk)

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

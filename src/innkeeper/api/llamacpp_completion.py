"""llama-server's native completion routes: POST /completion and POST /infill.

SillyTavern's "llama.cpp" Text Completion type generates through /completion and reads
`content`, `stop` and `completion_probabilities` from each event. Bodies are read by
llamacpp_request.py and run through `Service.start`: one scheduler, prefix reuse and
cancellation for every family. Answers copy llama-server's `to_json_non_oaicompat` shapes
(server-task.cpp).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request

from innkeeper.api.errors import ApiError, check_finish, finish_error
from innkeeper.api.llamacpp_request import (
    InfillBody,
    LlamaCompletionBody,
    OnePrompt,
    infill_prompt,
    prepare,
    single_prompt,
    start_runs,
)
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.openai import timings
from innkeeper.api.state import use_model
from innkeeper.api.streaming import ChunkTemplate, json_str, slot, sse, sse_runs_response
from innkeeper.engine.events import Event, FinishEvent, TokenEvent, TokenLogprob, TopLogprob
from innkeeper.engine.sampling import DEFAULT_ORDER, SamplingParams
from innkeeper.serving.generation import RunningGeneration
from innkeeper.serving.service import Service

router = APIRouter(tags=["llama.cpp"], route_class=OffLoopBodyRoute)


def params_json(p: SamplingParams) -> dict[str, Any]:
    """A request's samplers under llama-server's names (generation_settings, /slots)."""
    return {
        "seed": p.seed,
        "temperature": p.temperature,
        "dynatemp_range": p.dynatemp_range,
        "dynatemp_exponent": p.dynatemp_exponent,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "min_p": p.min_p,
        "top_n_sigma": p.top_n_sigma,
        "xtc_probability": p.xtc_probability,
        "xtc_threshold": p.xtc_threshold,
        "typical_p": p.typical_p,
        "repeat_last_n": p.repeat_last_n,
        "repeat_penalty": p.repeat_penalty,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "dry_multiplier": p.dry_multiplier,
        "dry_base": p.dry_base,
        "dry_allowed_length": p.dry_allowed_length,
        "dry_penalty_last_n": p.dry_penalty_last_n,
        "dry_sequence_breakers": p.dry_sequence_breakers,
        "mirostat": p.mirostat,
        "mirostat_tau": p.mirostat_tau,
        "mirostat_eta": p.mirostat_eta,
        "ignore_eos": p.ignore_eos,
        "logit_bias": [[t, b if b != float("-inf") else False] for t, b in p.logit_bias.items()],
        "grammar": p.grammar or "",
        "samplers": list(p.order or DEFAULT_ORDER),
    }


def _probs(lps: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
    def one(t: TokenLogprob | TopLogprob) -> dict[str, Any]:
        return {
            "id": t.token,
            "token": t.text,
            "bytes": list(t.text.encode("utf-8")),
            "logprob": t.logprob,
        }

    return [{**one(lp), "top_logprobs": [one(t) for t in lp.top]} for lp in lps]


def _stop_type(ev: FinishEvent) -> str:
    if ev.reason == "length":
        return "limit"
    if ev.reason != "stop":
        return "none"
    return "word" if ev.stop_string is not None else "eos"


def _pick(fields: list[str], res: dict[str, Any]) -> dict[str, Any]:
    """llama-server's `response_fields`: keep these; `a/b` moves a nested field to the top
    as `b`; a missing one is left out."""
    out: dict[str, Any] = {}
    for name in fields:
        value: Any = res
        for part in name.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            out[name.split("/")[-1]] = value
    return out


class _Answer:
    """Builds the events and final objects of one request's runs."""

    def __init__(
        self,
        service: Service,
        body: LlamaCompletionBody,
        runs: list[RunningGeneration],
        asked: list[int],
    ) -> None:
        self.service = service
        self.body = body
        self.runs = runs
        self.asked = asked  # each prompt's length as sent, before any left-trim
        self.predicted = [0] * len(runs)
        self._templates: dict[int, ChunkTemplate] = {}

    def final(self, i: int, ev: FinishEvent, content: str) -> dict[str, Any]:
        running = self.runs[i]
        req = running.request
        t = ev.timings
        n_ctx = self.service.n_ctx
        settings = {
            "n_ctx": self.service.n_ctx,
            "n_predict": req.max_tokens,
            "model": self.service.model_id,
            **params_json(req.params),
            "seed": ev.seed,
            "stop": req.stop,
            "n_probs": req.n_logprobs,
            "stream": self.body.stream,
        }
        res: dict[str, Any] = {
            "index": i,
            "content": content,
            "tokens": running.tokens if self.body.return_tokens else [],
            "id_slot": ev.slot,
            "stop": True,
            "model": self.service.model_id,
            "tokens_predicted": t.completion_tokens,
            "tokens_evaluated": t.prompt_tokens,
            "generation_settings": settings,
            "has_new_line": "\n" in running.text,
            "truncated": len(req.prompt) < self.asked[i]  # left-trimmed (truncation_length)
            or (ev.reason == "length" and t.prompt_tokens + t.completion_tokens >= n_ctx),
            "stop_type": _stop_type(ev),
            "stopping_word": ev.stop_string or "",
            "tokens_cached": t.cached_tokens,
            "timings": self._timings(ev),
        }
        if not self.body.stream and req.n_logprobs:
            res["completion_probabilities"] = _probs(running.logprobs)
        return _pick(self.body.response_fields, res) if self.body.response_fields else res

    @staticmethod
    def _timings(ev: FinishEvent) -> dict[str, Any]:
        out = timings(ev)
        t = ev.timings
        out["prompt_per_token_ms"] = (
            round(t.prompt_ms / t.evaluated_tokens, 3) if t.evaluated_tokens else 0.0
        )
        out["predicted_per_token_ms"] = (
            round(t.predicted_ms / t.completion_tokens, 3) if t.completion_tokens else 0.0
        )
        return out

    def chunk(self, i: int, text: Any, tokens: Any, predicted: Any) -> dict[str, Any]:
        return {
            "index": i,
            "content": text,
            "tokens": tokens,
            "stop": False,
            "id_slot": self.body.id_slot,  # as asked (-1: any); the final event's is real
            "tokens_predicted": predicted,
            "tokens_evaluated": len(self.runs[i].request.prompt),
        }

    def frame(self, i: int, ev: Event) -> bytes:
        if isinstance(ev, TokenEvent):
            self.predicted[i] += len(ev.tokens)
            if not ev.text and not ev.logprobs:
                return b""
            if ev.logprobs and self.runs[i].request.n_logprobs:
                chunk = self.chunk(i, ev.text, list(ev.tokens), self.predicted[i])
                chunk["completion_probabilities"] = _probs(ev.logprobs)
                return sse(chunk)
            # The same bytes as sse(self.chunk(...)): token ids and counts are plain ints.
            template = self._templates.get(i)
            if template is None:
                template = self._templates[i] = ChunkTemplate(
                    self.chunk(i, slot(0), slot(1), slot(2))
                )
            ids = "[" + ",".join(map(str, ev.tokens)) + "]"
            return template(json_str(ev.text), ids, str(self.predicted[i]))
        if ev.reason == "error":
            err = finish_error(ev)
            return sse({"error": {"code": err.status, "message": err.message, "type": err.type}})
        return sse(self.final(i, ev, ""))


async def complete(
    request: Request,
    service: Service,
    body: LlamaCompletionBody,
    prompts: list[OnePrompt],
    many: bool,
) -> Any:
    """Run `prompts` and answer as llama-server: one object, a list, or an SSE stream."""
    fixed, ids, media = await prepare(request, service, body, prompts)
    runs = start_runs(service, ids, fixed, media)
    answer = _Answer(service, fixed, runs, [len(p) for p in ids])
    if body.stream:
        return sse_runs_response(service, runs, answer.frame, tail=None)
    finals = await asyncio.gather(*(service.collect(request, r) for r in runs))
    results = []
    for i, (running, ev) in enumerate(zip(runs, finals, strict=True)):
        check_finish(ev)
        res = answer.final(i, ev, ev.text)
        if not body.response_fields:
            req = running.request
            res["prompt"] = service.detokenize_now(
                req.media.text_tokens() if req.media else req.prompt
            )
        results.append(res)
    return results if many else results[0]


@router.post("/completion")
async def completion(request: Request, body: LlamaCompletionBody) -> Any:
    service = await use_model(request, body.model)
    many = not single_prompt(body.prompt)
    prompts: list[OnePrompt] = [body.prompt]  # type: ignore[list-item]
    if many:  # in a list of prompts, a bare id is a prompt of one token
        prompts = [p if isinstance(p, str | list) else [p] for p in body.prompt]
    return await complete(request, service, body, prompts, many)


@router.post("/infill")
async def infill(request: Request, body: InfillBody) -> Any:
    """Code infilling for models with fill-in-the-middle tokens (a 409 for others)."""
    service = await use_model(request, body.model)
    fim = service.info.fim_tokens
    missing = [k for k in ("pre", "suf", "mid") if k not in fim]
    if missing:
        # llama-server answers 501; innkeeper keeps 5xx for its own failures (a valid request
        # that this model cannot serve is a conflict with what is loaded)
        raise ApiError(
            409,
            f"Infill is not supported by this model: {service.model_id!r} has no "
            f"fill-in-the-middle tokens ({', '.join('FIM_' + k.upper() for k in missing)} "
            "missing); /infill needs a code model with FIM tokens",
            "not_supported_error",
        )
    bos = service.bos if service.info.add_bos else None
    return await complete(request, service, body, [infill_prompt(fim, bos, body)], False)

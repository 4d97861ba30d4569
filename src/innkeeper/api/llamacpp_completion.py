"""llama-server's native completion routes: POST /completion and POST /infill.

SillyTavern's "llama.cpp" Text Completion type generates through /completion (its body uses
llama-server's sampler names, `dry_sequence_breakers` as a JSON string, `logit_bias` as
`[[id, bias]]` pairs) and reads `content`, `stop` and `completion_probabilities` from each
event. Bodies are normalised by the same `normalise` as every other family and run through
`Service.start`: one scheduler, prefix reuse and cancellation for all of them. Answers copy
llama-server's `to_json_non_oaicompat` shapes (server-task.cpp).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field, Strict

from innkeeper.api.errors import ApiError, check_finish, finish_error
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.openai import timings
from innkeeper.api.params import Generation, JsonBody, ParamError, SamplerFields, normalise
from innkeeper.api.state import use_model
from innkeeper.api.streaming import sse, sse_runs_response
from innkeeper.engine.events import Event, FinishEvent, TokenEvent, TokenLogprob, TopLogprob
from innkeeper.engine.json_schema import SchemaError, schema_grammar
from innkeeper.engine.sampling import DEFAULT_ORDER, SamplingParams
from innkeeper.serving.errors import NotFound
from innkeeper.serving.generation import RunningGeneration
from innkeeper.serving.service import Service

router = APIRouter(tags=["llama.cpp"], route_class=OffLoopBodyRoute)

MAX_PROMPTS = 64  # prompts in one request: more could only fill the queue (--max-queue)
# llama-server's sampler names that differ from text-generation-webui's (`samplers` is read
# as `sampler_priority`, which `normalise` already knows)
SAMPLER_NAMES = {"typ_p": "typical_p", "penalties": "repetition_penalty"}

MAX_BIAS_TEXT = 1000  # characters of one logit_bias text (as a stop string's bound)
TOKEN_ID = re.compile(r"-?[0-9]{1,10}")
Piece = int | str
OnePrompt = str | list[Piece]
# [[id or text, bias or false]] pairs: a JSON array read as a tuple (its items stay strict)
BiasPair = Annotated[tuple[int | str, float | bool], Strict(False)]
LogitBias = dict[str, float | bool] | list[BiasPair]


class LlamaCompletionBody(SamplerFields):
    """/completion's body: llama-server's names beside every alias `SamplerFields` knows."""

    model: str | None = None
    prompt: str | list[Piece | list[Piece]] = ""
    stream: bool = False
    cache_prompt: bool = Field(True, description="accepted; innkeeper always reuses the cache")
    id_slot: Annotated[int, Field(ge=-1)] = -1
    return_tokens: bool = False
    samplers: list[str] | None = None
    response_fields: list[str] | None = None
    n_keep: int | None = Field(None, description="accepted; the context is never shifted")
    min_keep: int | None = Field(None, description="accepted; not applied")
    t_max_predict_ms: int | None = Field(None, description="accepted; not applied")
    logit_bias: LogitBias | None = None  # type: ignore[assignment]
    json_schema: dict[str, Any] | None = Field(
        None, description="constrain the output to JSON matching this schema (unless grammar)"
    )


class InfillExtra(JsonBody):
    filename: str = ""
    text: str = ""


class InfillBody(LlamaCompletionBody):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: Annotated[list[InfillExtra], Field(max_length=MAX_PROMPTS)] = []
    prompt: str = ""


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


# ---- the request: prompts as token ids, samplers, runs ---------------------------------------
def _single(prompt: Any) -> bool:
    """llama-server's rule: a string, or a list of token ids (strings mixed in), is one
    prompt; any other list is several, and the answer is then a list."""
    if isinstance(prompt, str) or not prompt:
        return True
    return all(isinstance(p, int | str) for p in prompt) and any(isinstance(p, int) for p in prompt)


def _tokens(service: Service, prompt: OnePrompt, limit: int, cancel: threading.Event) -> list[int]:
    """One prompt as ids: strings tokenised (BOS only before a leading string), ids kept."""
    pieces: list[Piece] = [prompt] if isinstance(prompt, str) else list(prompt)
    out: list[int] = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, int):
            out.append(piece)
        else:
            out += service.tokenize_now(piece, i == 0, limit=limit, cancel=cancel)
        if len(out) > limit:
            raise ParamError(
                f"the prompt has more than {limit} tokens but the context holds "
                f"{service.n_ctx}: no room to generate"
            )
    return out


def _logit_bias(service: Service, value: LogitBias | None) -> dict[str, float] | None:
    """`[[id or text, bias or false]]` pairs, or an object, as `normalise`'s {id: bias}:
    text stands for each of its tokens, false bans the token (as -100 does)."""
    if value is None:
        return None
    pairs = list(value.items()) if isinstance(value, dict) else value
    out: dict[str, float] = {}
    for key, bias in pairs:
        if isinstance(bias, bool):
            if bias:
                continue  # true: llama-server leaves the token alone
            bias = -100.0
        if isinstance(key, int):
            ids = [key]
        elif TOKEN_ID.fullmatch(key):  # an object's keys are ids written as text
            ids = [int(key)]
        elif len(key) > MAX_BIAS_TEXT:
            raise ParamError(f"logit_bias: a text is at most {MAX_BIAS_TEXT} characters")
        else:
            ids = service.tokenize_now(key, False)
        for tok in ids:
            out[str(tok)] = float(bias)
    return out


def _body_fields(service: Service, body: LlamaCompletionBody) -> LlamaCompletionBody:
    """The body with llama-server's spellings turned into the ones `normalise` reads."""
    update: dict[str, Any] = {"logit_bias": _logit_bias(service, body.logit_bias)}
    if body.json_schema and not (body.grammar or body.grammar_string):
        try:
            update["grammar"] = schema_grammar(body.json_schema)
        except SchemaError as exc:
            raise ParamError(str(exc)) from exc
    if body.samplers is not None and body.sampler_priority is None:
        update["sampler_priority"] = [SAMPLER_NAMES.get(s, s) for s in body.samplers]
    return body.model_copy(update=update)


def _start(
    service: Service, prompts: list[list[int]], body: LlamaCompletionBody
) -> list[RunningGeneration]:
    """Every prompt checked, then every run started; all or none (as /v1/completions)."""
    if body.id_slot >= service.stats().slots:
        raise NotFound(f"id_slot {body.id_slot} does not exist (slots: {service.stats().slots})")
    runs: list[RunningGeneration] = []
    gens: list[Generation] = []
    for prompt in prompts:
        gen = normalise(body, n_vocab=service.n_vocab)
        service.prepare(prompt, gen, service.default_max_tokens)
        gens.append(gen)
    try:
        for prompt, gen in zip(prompts, gens, strict=True):
            runs.append(
                service.start(
                    prompt, gen, default_max_tokens=service.default_max_tokens, slot=body.id_slot
                )
            )
    except BaseException:
        service.release(runs)
        raise
    return runs


async def _prepare(
    request: Request, service: Service, body: LlamaCompletionBody, prompts: list[OnePrompt]
) -> tuple[LlamaCompletionBody, list[list[int]]]:
    """Tokenise the prompts and the logit-bias texts off the event loop; check the grammar."""
    if len(prompts) > MAX_PROMPTS:
        raise ParamError(f"at most {MAX_PROMPTS} prompts in one request (got {len(prompts)})")
    # the limit only depends on truncation_length: the bias pairs are read on the worker
    limit = service.prompt_limit(
        normalise(body.model_copy(update={"logit_bias": None}), n_vocab=service.n_vocab)
    )

    def work(cancel: threading.Event) -> tuple[LlamaCompletionBody, list[list[int]]]:
        fixed = _body_fields(service, body)
        return fixed, [_tokens(service, p, limit, cancel) for p in prompts]

    fixed, ids = await service.off_loop(work, request)
    await service.check_grammar(normalise(fixed, n_vocab=service.n_vocab).params.grammar)
    return fixed, ids


# ---- the answer ------------------------------------------------------------------------------
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

    def frame(self, i: int, ev: Event) -> Iterable[bytes]:
        if isinstance(ev, TokenEvent):
            self.predicted[i] += len(ev.tokens)
            if not ev.text and not ev.logprobs:
                return
            chunk: dict[str, Any] = {
                "index": i,
                "content": ev.text,
                "tokens": list(ev.tokens),
                "stop": False,
                "id_slot": self.body.id_slot,  # as asked (-1: any); the final event's is real
                "tokens_predicted": self.predicted[i],
                "tokens_evaluated": len(self.runs[i].request.prompt),
            }
            if ev.logprobs and self.runs[i].request.n_logprobs:
                chunk["completion_probabilities"] = _probs(ev.logprobs)
            yield sse(chunk)
            return
        if ev.reason == "error":
            err = finish_error(ev)
            yield sse({"error": {"code": err.status, "message": err.message, "type": err.type}})
            return
        yield sse(self.final(i, ev, ""))


async def complete(
    request: Request,
    service: Service,
    body: LlamaCompletionBody,
    prompts: list[OnePrompt],
    many: bool,
) -> Any:
    """Run `prompts` and answer as llama-server: one object, a list, or an SSE stream."""
    fixed, ids = await _prepare(request, service, body, prompts)
    runs = _start(service, ids, fixed)
    answer = _Answer(service, fixed, runs, [len(p) for p in ids])
    if body.stream:
        return sse_runs_response(service, runs, answer.frame, tail=None)
    finals = await asyncio.gather(*(service.collect(request, r) for r in runs))
    results = []
    for i, (running, ev) in enumerate(zip(runs, finals, strict=True)):
        check_finish(ev)
        res = answer.final(i, ev, ev.text)
        if not body.response_fields:
            res["prompt"] = service.detokenize_now(running.request.prompt)
        results.append(res)
    return results if many else results[0]


@router.post("/completion")
async def completion(request: Request, body: LlamaCompletionBody) -> Any:
    service = await use_model(request, body.model)
    many = not _single(body.prompt)
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


def infill_prompt(fim: dict[str, int], bos: int | None, body: InfillBody) -> list[Piece]:
    """llama-server's infill layout (format_prompt_infill): the repo-level pattern when the
    model has FIM_REP and FIM_SEP, else the extra chunks' text first; then
    FIM_PRE prefix FIM_SUF suffix FIM_MID prompt."""
    prompt: list[Piece] = [] if bos is None else [bos]
    if "rep" in fim and "sep" in fim:
        prompt += [fim["rep"], "myproject\n"]
        for extra in body.input_extra:
            prompt += [fim["sep"], f"{extra.filename}\n", extra.text]
        prompt += [fim["sep"], "filename\n"]
    else:
        prompt += [e.text for e in body.input_extra if e.text]
    prompt += [fim["pre"], body.input_prefix, fim["suf"], body.input_suffix, fim["mid"]]
    if body.prompt:
        prompt.append(body.prompt)
    return [p for p in prompt if p != ""]

"""llama-server's /completion and /infill bodies, read into token ids and a `Generation`.

The body takes llama-server's names beside every alias `SamplerFields` knows; its own
spellings (`samplers`, `logit_bias` pairs, `json_schema`) are turned into the fields
`normalise` reads, so there is one alias table. Prompts may be text, token ids, both mixed,
or a list of prompts; everything that grows with the body runs on the worker threads.
"""

from __future__ import annotations

import re
import threading
from typing import Annotated, Any

from fastapi import Request
from pydantic import Field, Strict

from innkeeper.api import images
from innkeeper.api.params import Generation, JsonBody, ParamError, SamplerFields, normalise
from innkeeper.engine.json_schema import SchemaError, schema_grammar
from innkeeper.engine.vision import MediaPrompt
from innkeeper.serving.errors import NotFound
from innkeeper.serving.generation import RunningGeneration
from innkeeper.serving.service import Service

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


class ImageData(JsonBody):
    """One of /completion's `image_data`: base64 image bytes, named `[img-ID]` in the prompt."""

    data: str
    id: int = 0


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
    image_data: list[ImageData] | None = Field(
        None, description="images (base64) for a vision model, placed where [img-ID] is"
    )


class InfillExtra(JsonBody):
    filename: str = ""
    text: str = ""


class InfillBody(LlamaCompletionBody):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: Annotated[list[InfillExtra], Field(max_length=MAX_PROMPTS)] = []
    prompt: str = ""


def single_prompt(prompt: Any) -> bool:
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
    text stands for each of its tokens, false bans the token (as -100 does); an id outside
    the vocabulary is ignored, as llama-server ignores it."""
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
            if 0 <= tok < service.n_vocab:  # as llama-server: ids outside the vocabulary
                out[str(tok)] = float(bias)  # are skipped, not an error
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


def start_runs(
    service: Service,
    prompts: list[list[int]],
    body: LlamaCompletionBody,
    media: MediaPrompt | None = None,
) -> list[RunningGeneration]:
    """Every prompt checked, then every run started; all or none (as /v1/completions)."""
    if body.id_slot >= service.stats().slots:
        raise NotFound(f"id_slot {body.id_slot} does not exist (slots: {service.stats().slots})")
    runs: list[RunningGeneration] = []
    gens: list[Generation] = []
    for prompt in prompts:
        gen = normalise(body, n_vocab=service.n_vocab)
        service.prepare(prompt, gen, service.default_max_tokens, media)
        gens.append(gen)
    try:
        for prompt, gen in zip(prompts, gens, strict=True):
            runs.append(
                service.start(
                    prompt,
                    gen,
                    default_max_tokens=service.default_max_tokens,
                    slot=body.id_slot,
                    media=media,
                )
            )
    except BaseException:
        service.release(runs)
        raise
    return runs


async def prepare(
    request: Request, service: Service, body: LlamaCompletionBody, prompts: list[OnePrompt]
) -> tuple[LlamaCompletionBody, list[list[int]], MediaPrompt | None]:
    """Tokenise the prompts (with their images) and the logit-bias texts off the event loop;
    check the grammar."""
    if len(prompts) > MAX_PROMPTS:
        raise ParamError(f"at most {MAX_PROMPTS} prompts in one request (got {len(prompts)})")
    image_limits = images.limits_of(request)
    if body.image_data:
        images.check_count(len(body.image_data), image_limits)
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise ParamError("image_data goes with one text prompt")
    # the limit only depends on truncation_length: the bias pairs are read on the worker
    limit = service.prompt_limit(
        normalise(body.model_copy(update={"logit_bias": None}), n_vocab=service.n_vocab)
    )

    def work(
        cancel: threading.Event,
    ) -> tuple[LlamaCompletionBody, list[list[int]], MediaPrompt | None]:
        fixed = _body_fields(service, body)
        if body.image_data:
            raw = {d.id: images.from_data_uri(d.data) for d in body.image_data}
            text, order = images.tagged_images(str(prompts[0]), raw)
            media = images.media_prompt(service, text, order, image_limits, limit)
            return fixed, [media.tokens], media
        return fixed, [_tokens(service, p, limit, cancel) for p in prompts], None

    fixed, ids, media = await service.off_loop(work, request)
    await service.check_grammar(normalise(fixed, n_vocab=service.n_vocab).params.grammar)
    return fixed, ids, media


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

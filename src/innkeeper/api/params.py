"""The union of every client's parameter names -> one `SamplingParams` and stop rules.

SillyTavern sends several spellings of the same setting at once (`max_tokens`,
`max_new_tokens`, `n_predict`…; `rep_pen`, `repetition_penalty`, `repeat_penalty`). Each
spelling is its own optional field here, so the OpenAPI document lists them all, and
`normalise` merges them with KoboldCpp's rules (the largest repetition penalty wins;
presence penalty falls back to frequency penalty…). Unknown fields are ignored.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from innkeeper.engine.sampling import (
    DEFAULT_ORDER,
    KOBOLD_SAMPLER_IDS,
    TGW_SAMPLER_NAMES,
    SamplingParams,
)
from innkeeper.serving.errors import ParamError
from innkeeper.serving.generation import Generation

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
NonNeg = Annotated[float, Field(ge=0.0)]
Penalty = Annotated[float, Field(gt=0.0, le=100.0)]
Range = Annotated[int, Field(ge=-1)]
# 2**53 - 1: the largest integer a JSON number carries exactly (JavaScript clients, floats)
Seed = Annotated[int, Field(ge=-1, le=2**53 - 1)]
MAX_STOPS = 64
MAX_STOP_LENGTH = 1000
# the length spellings, in the order of precedence when a client sends several
LENGTH_ALIASES = (
    "max_tokens",
    "max_completion_tokens",
    "max_new_tokens",
    "max_length",
    "n_predict",
    "num_predict",
)
# custom_token_bans as text: "1,2,3" or "[1, 2, 3]"; `{id}` is a token id's pattern
TOKEN_BANS_SYNTAX = r"[ \t]*\[?[ \t]*({id}([ \t]*,[ \t]*{id})*)?[ \t]*,?[ \t]*\]?[ \t]*"
DECIMAL = "(0|[1-9][0-9]*)"


def _integral_floats_to_ints(value: Any) -> Any:
    """JSON Schema counts 4.0 as an integer; strict validation would not, so convert."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_to_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_to_ints(v) for k, v in value.items()}
    return value


class JsonBody(BaseModel):
    """A request body validated by JSON types, as the OpenAPI document states them: no "5"
    for 5 and no 0 for false (SillyTavern, KoboldAI Lite and the openai SDK all send real
    JSON types); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_integers(cls, data: Any) -> Any:
        return _integral_floats_to_ints(data)


class SamplerFields(JsonBody):
    """Every sampler and stop setting any client sends, under every name it uses."""

    temperature: NonNeg | None = Field(None, le=100.0)
    top_k: Annotated[int, Field(ge=-1)] | None = None
    top_p: Prob | None = None
    min_p: Prob | None = None
    typical_p: Prob | None = None
    typical: Prob | None = Field(None, description="KoboldAI spelling of typical_p")
    top_a: NonNeg | None = Field(None, description="accepted; llama.cpp has no top-a sampler")
    tfs: Prob | None = Field(None, description="accepted; llama.cpp removed tail-free sampling")
    tfs_z: Prob | None = None
    top_n_sigma: float | None = None
    smoothing_factor: NonNeg | None = Field(None, description="accepted; not in llama.cpp")
    smoothing_curve: float | None = None
    dynamic_temperature: bool | None = None
    dynatemp_range: NonNeg | None = None
    dynatemp_low: NonNeg | None = None
    dynatemp_high: NonNeg | None = None
    dynatemp_exponent: NonNeg | None = None
    repetition_penalty: Penalty | None = None
    rep_pen: Penalty | None = None
    repeat_penalty: Penalty | None = None
    repetition_penalty_range: Range | None = None
    rep_pen_range: Range | None = None
    repeat_last_n: Range | None = None
    rep_pen_slope: float | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    mirostat_mode: Annotated[int, Field(ge=0, le=2)] | None = None
    mirostat: Annotated[int, Field(ge=0, le=2)] | None = None
    mirostat_tau: NonNeg | None = None
    mirostat_eta: NonNeg | None = None
    dry_multiplier: NonNeg | None = None
    dry_base: NonNeg | None = None
    dry_allowed_length: Annotated[int, Field(ge=0)] | None = None
    dry_penalty_last_n: Range | None = None
    dry_sequence_breakers: list[str] | str | None = None
    xtc_threshold: Prob | None = None
    xtc_probability: Prob | None = None
    sampler_order: list[int] | None = None
    sampler_priority: list[str] | str | None = None
    seed: Seed | None = None
    sampler_seed: Seed | None = None
    stop: list[str] | str | None = None
    stopping_strings: list[str] | str | None = None
    stop_sequence: list[str] | str | None = None
    ban_eos_token: bool | None = None
    ignore_eos: bool | None = None
    use_default_badwordsids: bool | None = None
    custom_token_bans: str | list[int] | None = None
    banned_strings: list[str] | None = None
    banned_tokens: list[str] | None = Field(None, description="KoboldCpp: banned phrases")
    logit_bias: dict[str, float] | None = None
    grammar: str | None = None
    grammar_string: str | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    n_probs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_tokens: int | None = None
    max_new_tokens: int | None = None
    max_completion_tokens: int | None = None
    n_predict: int | None = None
    num_predict: int | None = None
    max_length: int | None = Field(None, description="KoboldAI: tokens to generate")
    truncation_length: Annotated[int, Field(ge=0)] | None = None
    max_context_length: Annotated[int, Field(ge=0)] | None = None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_list(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def parse_breakers(value: list[str] | str | None) -> list[str] | None:
    """DRY sequence breakers arrive as a list, a JSON string, or a bracket-less string."""
    if value is None or isinstance(value, list):
        return value
    text = value.strip()
    if not text:
        return []
    if not text.startswith("["):
        text = f"[{text}]"
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParamError(f"dry_sequence_breakers is not a JSON list of strings: {exc.msg}") from exc
    if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
        raise ParamError("dry_sequence_breakers must be a list of strings")
    return parsed


def parse_token_bans(value: str | list[int] | None, n_vocab: int) -> list[int]:
    if value is None:
        return []
    items: list[Any]
    if isinstance(value, str):
        if not re.fullmatch(TOKEN_BANS_SYNTAX.format(id=DECIMAL), value):
            raise ParamError(f"custom_token_bans: {value[:100]!r} is not a list of token ids")
        items = [x.strip() for x in value.replace("[", "").replace("]", "").split(",") if x.strip()]
    else:
        items = list(value)
    out = []
    for item in items:
        try:
            tok = int(item)
        except (TypeError, ValueError) as exc:
            raise ParamError(f"custom_token_bans: {item!r} is not a token id") from exc
        if not 0 <= tok < n_vocab:
            raise ParamError(f"custom_token_bans: token id {tok} is outside the vocabulary")
        out.append(tok)
    return out


def parse_logit_bias(value: dict[str, float] | None, n_vocab: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, bias in (value or {}).items():
        try:
            tok = int(key)
        except ValueError as exc:
            raise ParamError(f"logit_bias: key {key!r} is not a token id") from exc
        if not 0 <= tok < n_vocab:
            raise ParamError(f"logit_bias: token id {tok} is outside the vocabulary")
        if bias != bias:  # NaN
            raise ParamError("logit_bias values must be numbers")
        out[tok] = float("-inf") if bias <= -100 else float(bias)
    return out


def _order(f: SamplerFields) -> list[str] | None:
    if f.sampler_order:
        names = []
        for i in f.sampler_order:
            if i not in KOBOLD_SAMPLER_IDS:
                raise ParamError(f"sampler_order: unknown sampler id {i} (valid: 0-6)")
            names.append(KOBOLD_SAMPLER_IDS[i])
        return [n for n in names if n in DEFAULT_ORDER]
    if f.sampler_priority:
        raw = f.sampler_priority
        items = raw.split("\n") if isinstance(raw, str) else raw
        names = [TGW_SAMPLER_NAMES.get(x.strip()) for x in items]
        return [n for n in names if n in DEFAULT_ORDER]
    return None


def normalise(
    f: SamplerFields, *, n_vocab: int, defaults: SamplingParams | None = None
) -> Generation:
    """Merge every alias into one Generation, or raise ParamError with what is wrong."""
    base = defaults or SamplingParams()
    rep = [v for v in (f.repetition_penalty, f.rep_pen, f.repeat_penalty) if v is not None]
    presence = _first(f.presence_penalty)
    dynatemp_range = f.dynatemp_range
    temperature = _first(f.temperature, base.temperature)
    if f.dynamic_temperature and f.dynatemp_low is not None and f.dynatemp_high is not None:
        if f.dynatemp_low > f.dynatemp_high:
            raise ParamError("dynatemp_low must not exceed dynatemp_high")
        temperature = (f.dynatemp_low + f.dynatemp_high) / 2
        dynatemp_range = (f.dynatemp_high - f.dynatemp_low) / 2
    elif f.dynamic_temperature is False:
        dynatemp_range = 0.0
    tfs = _first(f.tfs, f.tfs_z, base.tfs)
    grammar = _first(f.grammar, f.grammar_string) or None
    breakers = parse_breakers(f.dry_sequence_breakers)
    params = SamplingParams(
        temperature=temperature,
        top_k=_first(f.top_k, base.top_k),
        top_p=_first(f.top_p, base.top_p),
        min_p=_first(f.min_p, base.min_p),
        typical_p=_first(f.typical_p, f.typical, base.typical_p),
        top_n_sigma=_first(f.top_n_sigma, base.top_n_sigma),
        top_a=_first(f.top_a, base.top_a),
        tfs=tfs,
        smoothing_factor=_first(f.smoothing_factor, base.smoothing_factor),
        dynatemp_range=_first(dynatemp_range, base.dynatemp_range),
        dynatemp_exponent=_first(f.dynatemp_exponent, base.dynatemp_exponent),
        repeat_penalty=max(rep) if rep else base.repeat_penalty,
        repeat_last_n=_first(
            f.rep_pen_range, f.repetition_penalty_range, f.repeat_last_n, base.repeat_last_n
        ),
        rep_pen_slope=_first(f.rep_pen_slope, base.rep_pen_slope),
        presence_penalty=_first(presence, base.presence_penalty),
        frequency_penalty=_first(f.frequency_penalty, base.frequency_penalty),
        mirostat=_first(f.mirostat_mode, f.mirostat, base.mirostat),
        mirostat_tau=_first(f.mirostat_tau, base.mirostat_tau),
        mirostat_eta=_first(f.mirostat_eta, base.mirostat_eta),
        dry_multiplier=_first(f.dry_multiplier, base.dry_multiplier),
        dry_base=_first(f.dry_base, base.dry_base),
        dry_allowed_length=_first(f.dry_allowed_length, base.dry_allowed_length),
        dry_penalty_last_n=_first(f.dry_penalty_last_n, base.dry_penalty_last_n),
        dry_sequence_breakers=breakers if breakers is not None else base.dry_sequence_breakers,
        xtc_threshold=_first(f.xtc_threshold, base.xtc_threshold),
        xtc_probability=_first(f.xtc_probability, base.xtc_probability),
        logit_bias=parse_logit_bias(f.logit_bias, n_vocab),
        banned_tokens=parse_token_bans(f.custom_token_bans, n_vocab),
        ignore_eos=bool(f.ignore_eos or f.ban_eos_token or f.use_default_badwordsids),
        grammar=grammar,
        seed=_first(f.seed, f.sampler_seed, base.seed),
        order=_order(f),
    )
    if params.top_k is not None and params.top_k < 0:
        params.top_k = 0

    stops = _as_list(f.stop) + _as_list(f.stopping_strings) + _as_list(f.stop_sequence)
    stops = list(dict.fromkeys(s for s in stops if s))
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise ParamError(
            f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_LENGTH} characters"
        )
    banned = list(dict.fromkeys(s for s in (f.banned_strings or []) + (f.banned_tokens or []) if s))
    if len(banned) > MAX_STOPS or any(len(s) > MAX_STOP_LENGTH for s in banned):
        raise ParamError(
            f"at most {MAX_STOPS} banned strings of at most {MAX_STOP_LENGTH} characters"
        )

    # every spelling given is checked, not only the one used, as the OpenAPI document says
    lengths = {name: value for name in LENGTH_ALIASES if (value := getattr(f, name)) is not None}
    for name, value in lengths.items():
        if value <= 0 and not (name == "n_predict" and value == -1):
            raise ParamError(f"{name} must be at least 1 (got {value})")
    max_tokens = next(iter(lengths.values()), None)
    if max_tokens == -1:
        max_tokens = None  # llama.cpp's n_predict -1: until the context is full
    longest = max(lengths.items(), key=lambda kv: kv[1], default=None)
    for name in ("truncation_length", "max_context_length"):
        if getattr(f, name) == 1:
            raise ParamError(f"{name} must be 0 (no limit) or at least 2: 1 leaves no room")
    truncate_to = _first(f.truncation_length, f.max_context_length) or None
    return Generation(
        params=params,
        max_tokens=max_tokens,
        stop=stops,
        banned_strings=banned,
        truncate_to=truncate_to,
        longest=longest,
        min_tokens=f.min_tokens or 0,
        n_probs=f.n_probs or 0,
        unsupported=params.unsupported(),
    )

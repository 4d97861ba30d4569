"""Property tests for parameter normalisation: any mix of aliases and values, as a client's
JSON could carry them, becomes valid sampler settings or a clean 4xx error - and every
valid result builds and runs a llama.cpp sampler chain on the real model without crashing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from innkeeper.api.params import Generation, ParamError, SamplerFields, normalise
from innkeeper.engine.backend import Batch, Context, ContextParams, Model
from innkeeper.engine.sampling import DEFAULT_ORDER, GrammarError, SamplerChain
from innkeeper.models.store import default_model_path

N_VOCAB = 49152  # SmolLM2's vocabulary (checked against the model below)

numbers = st.one_of(
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.5, 2.5),
    st.sampled_from([0, 1, -1, 0.5, 1.0, 100, 101, 2**31, 2**63, -(2**63)]),
)
texts = st.one_of(
    st.text(max_size=12), st.sampled_from(["", "\n", "###", "[1,2]", '["a"]', "1,2,x"])
)
junk = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.one_of(
    junk,
    st.lists(st.one_of(texts, st.integers(-5, 60000)), max_size=5),
    st.dictionaries(st.one_of(st.integers(-5, 60000).map(str), texts), numbers, max_size=4),
)
ALIASES = sorted(SamplerFields.model_fields)
GRAMMARS = st.sampled_from([None, "", 'root ::= "a" | "b"', "root ::= (", "root ::= [a-z]+"])


def plausible(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the types and ranges a field's schema declares (edges included)."""
    options = []
    for sub in schema.get("anyOf", [schema]):
        kind = sub.get("type")
        lo = sub.get("minimum", sub.get("exclusiveMinimum"))
        hi = sub.get("maximum")
        if kind == "number":
            lo_f = -3.0 if lo is None else float(lo)
            hi_f = lo_f + 5.0 if hi is None else float(hi)
            options.append(st.floats(lo_f, hi_f, allow_nan=False))
            options.append(st.sampled_from([x for x in (lo, hi) if x is not None] or [0.0]))
        elif kind == "integer":
            lo_i = -3 if lo is None else int(lo)
            hi_i = lo_i + 4100 if hi is None else int(hi)
            options.append(st.integers(lo_i, min(hi_i, lo_i + 70000)))
            options.append(st.sampled_from([x for x in (lo, hi) if x is not None] or [0]))
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "string":
            options.append(texts)
        elif kind == "array":
            item = sub.get("items", {}).get("type")
            options.append(
                st.lists(st.integers(-2, N_VOCAB + 2) if item == "integer" else texts, max_size=4)
            )
        elif kind == "object":
            options.append(
                st.dictionaries(st.integers(-2, N_VOCAB + 2).map(str), numbers, max_size=3)
            )
        elif kind == "null":
            options.append(st.none())
    return st.one_of(options) if options else junk


SCHEMA = SamplerFields.model_json_schema()["properties"]


def body_strategy() -> st.SearchStrategy[dict[str, Any]]:
    """Half the bodies are well-typed (they reach `normalise` and the sampler chain), half
    mix in junk of any JSON type (they must be refused cleanly)."""

    def with_specials(
        per_field: dict[str, st.SearchStrategy[Any]],
    ) -> st.SearchStrategy[dict[str, Any]]:
        fields = dict(per_field)
        fields["grammar"] = GRAMMARS
        fields["grammar_string"] = GRAMMARS
        fields["sampler_order"] = st.lists(st.integers(-1, 8), max_size=8)
        fields["sampler_priority"] = st.one_of(
            st.lists(
                st.sampled_from(["temperature", "top_k", "min_p", "dry", "xtc", "bogus", "top_a"])
            ),
            st.just("temperature\ntop_k\nmin_p"),
        )
        fields["unknown_st_key"] = junk  # SillyTavern sends keys the server does not know
        return st.fixed_dictionaries({}, optional=fields)

    typed = with_specials({name: plausible(SCHEMA[name]) for name in ALIASES})
    mixed = with_specials({name: st.one_of(plausible(SCHEMA[name]), values) for name in ALIASES})
    return st.one_of(typed, mixed)


def check_valid(gen: Generation) -> None:
    """What the engine relies on for a normalised request."""
    p = gen.params
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "xtc_threshold",
        "xtc_probability",
        "dry_multiplier",
        "dry_base",
        "mirostat_tau",
        "mirostat_eta",
    ):
        value = getattr(p, name)
        assert isinstance(value, int | float) and not math.isnan(value), (name, value)
    assert 0 <= p.temperature <= 100
    assert p.top_k >= 0
    assert 0 <= p.top_p <= 1 and 0 <= p.min_p <= 1 and 0 <= p.typical_p <= 1
    assert 0 < p.repeat_penalty <= 100
    assert p.repeat_last_n >= -1 and p.dry_penalty_last_n >= -1
    assert p.mirostat in (0, 1, 2)
    assert all(0 <= tok < N_VOCAB for tok in p.logit_bias)
    assert all(not math.isnan(b) for b in p.logit_bias.values())
    assert all(0 <= tok < N_VOCAB for tok in p.banned_tokens)
    assert p.order is None or set(p.order) <= set(DEFAULT_ORDER)
    assert all(isinstance(b, str) for b in p.dry_sequence_breakers)
    assert -1 <= p.seed < 2**63
    assert 0 <= p.resolved_seed() < 2**32
    assert gen.max_tokens is None or gen.max_tokens >= 1
    assert all(isinstance(s, str) and s for s in gen.stop)
    assert gen.truncate_to is None or gen.truncate_to > 0
    assert gen.min_tokens >= 0 and 0 <= gen.n_probs <= 20


@pytest.fixture(scope="module")
def llama() -> Iterator[tuple[Model, Context, int]]:
    """The real model, and a context holding the logits of one decoded prompt."""
    model = Model(default_model_path())
    assert model.n_vocab == N_VOCAB
    ctx = Context(model, ContextParams(n_ctx=256, n_batch=64, n_ubatch=64, threads=2))
    prompt = model.tokenize("Once upon a time")
    batch = Batch(64)
    batch.add_span(prompt, 0, 0, True)
    assert ctx.decode(batch) == 0
    yield model, ctx, len(prompt) - 1
    batch.free()
    ctx.close()
    model.close()


def normalise_or_reject(body: dict[str, Any]) -> Generation | None:
    """None when the body is refused the way the routes refuse it (422/400)."""
    try:
        fields = SamplerFields.model_validate(body)
    except ValidationError:
        return None
    try:
        return normalise(fields, n_vocab=N_VOCAB)
    except ParamError as exc:
        assert str(exc)  # a message the client can read
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=body_strategy())
def test_any_alias_mix_normalises_or_is_a_4xx(body: dict[str, Any]) -> None:
    gen = normalise_or_reject(body)
    if gen is not None:
        check_valid(gen)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=body_strategy())
def test_valid_settings_build_and_run_a_sampler_chain(
    llama: tuple[Model, Context, int], body: dict[str, Any]
) -> None:
    model, ctx, row = llama
    gen = normalise_or_reject(body)
    if gen is None:
        return
    seed = gen.params.resolved_seed()
    try:
        chain = SamplerChain(model, gen.params, seed, ctx.n_ctx)
    except GrammarError:
        assert gen.params.grammar  # only a grammar can be refused at build time
        return
    try:
        chain.accept_prompt(model.tokenize("Once upon a time, a fox said"))
        tok = chain.sample(ctx.ptr, row)
        assert 0 <= tok < model.n_vocab
    finally:
        chain.free()

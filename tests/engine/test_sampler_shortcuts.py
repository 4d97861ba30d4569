"""The sampler shortcuts pick exactly the tokens llama.cpp's own chain picks.

`SamplerChain` applies logit biases and repetition/presence penalties to the logits row in
numpy, and takes the arg-max itself for greedy decoding, where that gives the same tokens
(engine/row_edits.py). These tests run every such chain next to the plain llama.cpp chain
(`shortcuts=False`) on the same rows of a real context's output buffer: the embedded model's
own logits, and rows built to hit ties, float32 rounding, infinities and NaN; over sequences,
so the penalty history of both must stay in step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from innkeeper.engine import sampling
from innkeeper.engine.backend import Batch, Context, Model
from innkeeper.engine.llama_params import ContextParams
from innkeeper.engine.sampling import SamplerChain, SamplingParams
from innkeeper.models.store import default_model_path

Llama = tuple[Model, Context, int]


@pytest.fixture(scope="module")
def llama() -> Iterator[Llama]:
    """The model, a context that decoded a prompt, and the batch row holding its logits."""
    model = Model(default_model_path())
    ctx = Context(model, ContextParams(n_ctx=256, n_seq=1, threads=2))
    batch = Batch(64)
    tokens = model.tokenize("The capital of France is", add_special=False)
    for i, tok in enumerate(tokens):
        batch.add(tok, i, 0, i == len(tokens) - 1)
    assert ctx.decode(batch) == 0
    yield model, ctx, len(tokens) - 1
    ctx.close()
    model.close()


@pytest.fixture(autouse=True)
def every_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2's vocabulary counts as large: every shortcut runs. Which ones pay for which
    vocabulary is a speed question (bench.overhead); they must pick the same tokens for any."""
    monkeypatch.setattr(sampling, "LARGE_VOCAB", 0)


def write_row(llama: Llama, values: np.ndarray) -> None:
    _, ctx, row = llama
    np.ctypeslib.as_array(ctx.logits(row))[:] = values


def real_row(llama: Llama) -> np.ndarray:
    _, ctx, row = llama
    return np.ctypeslib.as_array(ctx.logits(row)).copy()


class Pair:
    """The shortcut chain and the plain llama.cpp chain for the same parameters and seed."""

    def __init__(self, llama: Llama, params: SamplingParams, prompt: list[int] = ()) -> None:
        self.llama = llama
        model, ctx, _ = llama
        self.fast = SamplerChain(model, params, 7, ctx.n_ctx)
        self.ref = SamplerChain(model, params, 7, ctx.n_ctx, shortcuts=False)
        assert self.ref.edits is None and not self.ref.argmax
        for chain in (self.fast, self.ref):
            chain.accept_prompt(list(prompt))

    def step(self, values: np.ndarray) -> tuple[int, int]:
        """Both picks from `values` (the reference first: the shortcut edits the row)."""
        _, ctx, row = self.llama
        write_row(self.llama, values)
        ref = self.ref.sample(ctx.ptr, row)
        write_row(self.llama, values)
        return self.fast.sample(ctx.ptr, row), ref

    def free(self) -> None:
        self.fast.free()
        self.ref.free()


def same_picks(llama: Llama, params: SamplingParams, rows: list[np.ndarray], prompt=()) -> bool:
    """Both chains pick the same token from every row in turn; whether shortcuts ran."""
    pair = Pair(llama, params, prompt)
    try:
        for i, values in enumerate(rows):
            fast, ref = pair.step(values)
            assert fast == ref, (params, i)
        return pair.fast.edits is not None
    finally:
        pair.free()


def test_the_models_own_logits_with_biases_and_penalties(llama: Llama) -> None:
    real = real_row(llama)
    order = np.argsort(-real)
    top, second = int(order[0]), int(order[1])
    greedy = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, ignore_eos=True),
        SamplingParams(temperature=0, banned_tokens=[top]),
        SamplingParams(temperature=0, logit_bias={second: 0.5}),
        SamplingParams(temperature=0, logit_bias={second: float(real[top] - real[second])}),
        SamplingParams(temperature=0, logit_bias={5: 100.0, 7: -math.inf}),
        SamplingParams(temperature=0, repeat_penalty=1.3),
        SamplingParams(temperature=0, repeat_penalty=0.8, presence_penalty=0.4, ignore_eos=True),
    ]
    sampled = [
        SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=7),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05, repeat_penalty=1.1),
        SamplingParams(temperature=1.3, min_p=0.02, repeat_penalty=1.2, presence_penalty=0.6),
        SamplingParams(temperature=0.9, repeat_penalty=1.15, dry_multiplier=0.8),
        SamplingParams(temperature=0, repeat_penalty=1.15, dry_multiplier=0.8),  # no arg-max
        SamplingParams(temperature=1.0, xtc_probability=0.5, repeat_penalty=1.1, ignore_eos=True),
        # min-p first (SillyTavern's Universal presets): the chain sees only its candidates.
        SamplingParams(temperature=1.25, top_k=0, top_p=1.0, min_p=0.1, seed=3),
        SamplingParams(temperature=1.5, top_k=0, top_p=1, min_p=0.02, ignore_eos=True),
        SamplingParams(
            temperature=1.0, top_k=0, top_p=1, min_p=0.05, xtc_probability=0.5, repeat_penalty=1.2
        ),
    ]
    # The prompt puts the likeliest tokens into the penalty history; each row then moves the
    # logits a little, so a sequence of picks wanders and the histories must keep in step.
    prompt = [top, second, top, int(order[2]), 11, 12]
    rng = np.random.default_rng(3)
    rows = [real + rng.normal(0, 0.3, real.size).astype(np.float32) for _ in range(40)]
    took = [same_picks(llama, params, rows, prompt) for params in greedy + sampled]
    assert took.count(False) == 1  # only the top-k chain with no penalty keeps to C
    write_row(llama, real)


def test_ties_rounding_infinities_and_nan(llama: Llama) -> None:
    model, _, _ = llama
    n = model.n_vocab
    base = np.full(n, -5.0, dtype=np.float32)

    def case(updates: dict[int, float], params: SamplingParams, prompt=(), steps=1) -> None:
        values = base.copy()
        for tok, v in updates.items():
            values[tok] = v
        same_picks(llama, params, [values] * steps, prompt)

    def greedy(**kw) -> SamplingParams:
        return SamplingParams(temperature=0, **kw)

    case({10: 3.0, 20: 3.0, 30: 3.0}, greedy())  # equal maxima: the lowest token
    case({10: 3.0, 20: 3.0}, greedy(logit_bias={5: 8.0}))  # a biased token ties from below
    case({10: 3.0}, greedy(logit_bias={7: 1.0, 3: 0.0}))
    case({100: 1.0, 50: 0.9}, greedy(logit_bias={50: 0.1}))  # 0.9 + 0.1 in float32
    case({100: 1.0000001, 50: 0.9}, greedy(logit_bias={50: 0.1000001}))
    case({100: 2.0, 50: 2.0 - 2**-22}, greedy(logit_bias={50: 2**-23}))  # rounds in float32
    case({100: math.inf, 200: math.inf}, greedy())
    case({100: math.inf}, greedy(logit_bias={100: -math.inf}))  # inf - inf: NaN
    case({100: 1.0, 99: math.nan}, greedy())  # NaN in the row: llama.cpp's rules
    case({i: -math.inf for i in range(0, n, 2)}, greedy(logit_bias={1: -math.inf}))
    # Penalties: a penalised top token ties or falls under the next one, on both signs.
    case({10: 2.2, 20: 2.0}, greedy(repeat_penalty=1.1), prompt=[10])
    case({10: -0.5, 20: -0.55}, greedy(repeat_penalty=1.1), prompt=[10])
    case({10: 0.0, 20: -0.0}, greedy(repeat_penalty=2.0, presence_penalty=0.0), prompt=[10, 20])
    case({10: 1.0, 20: 0.5}, greedy(presence_penalty=0.5), prompt=[10, 10, 10])
    case({10: 1.0, 20: 1.0}, greedy(repeat_penalty=1.0, presence_penalty=0.5), prompt=[20])
    # Only the last `repeat_last_n` tokens count: 10 has left the window, 30 has not.
    window = greedy(repeat_penalty=1.5, repeat_last_n=2)
    case({10: 2.0, 40: 1.95}, window, prompt=[10, 20, 30])
    case({30: 2.0, 40: 1.95}, window, prompt=[10, 20, 30])
    # min-p first: the survivors sit exactly at, just above and just below the threshold.
    min_p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=9)
    edge = float(np.float32(1.0 + math.log(0.5)))
    # Over 40 draws each survivor is picked at least once (each has p >= 1/3).
    below = np.nextafter(np.float32(edge), np.float32(0))
    case({10: 1.0, 20: edge, 30: below}, min_p, steps=40)
    case(
        {10: 1.0, 20: np.nextafter(np.float32(edge), np.float32(9)), 30: edge - 1e-3},
        min_p,
        steps=40,
    )
    case({10: 1.0, 99: math.nan}, min_p)  # NaN: the whole row goes to llama.cpp
    case(
        {i: -math.inf for i in range(n)},
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5),
    )
    write_row(llama, base)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    levels=st.lists(
        st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 2.0, 2.0000002]), min_size=1, max_size=6
    ),
)
def test_random_rows_biases_penalties_and_histories(llama: Llama, data, levels) -> None:
    """Rows with few distinct values (ties are common), biases on random tokens, penalties,
    a random history (the prompt), greedy or sampled, over a few steps."""
    model, _, _ = llama
    n = model.n_vocab
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    hot = rng.integers(0, n, 12)  # the tokens the biases, the history and the levels share
    token = st.sampled_from(hot.tolist())
    rows = []
    for _ in range(3):
        values = np.full(n, -3.0, dtype=np.float32)
        values[hot] = np.asarray(levels, dtype=np.float32)[rng.integers(0, len(levels), 12)]
        rows.append(values)
    bias = data.draw(
        st.dictionaries(token, st.sampled_from([-math.inf, -1.0, -0.5, 0.5, 2.5]), max_size=4)
    )
    params = SamplingParams(
        temperature=data.draw(st.sampled_from([0.0, 0.8])),
        top_k=data.draw(st.sampled_from([0, 3, 40])),
        top_p=data.draw(st.sampled_from([1.0, 0.95])),
        min_p=data.draw(st.sampled_from([0.0, 0.05, 0.5])),
        repeat_penalty=data.draw(st.sampled_from([1.0, 0.9, 1.1, 1.5])),
        presence_penalty=data.draw(st.sampled_from([0.0, 0.5])),
        repeat_last_n=data.draw(st.sampled_from([-1, 0, 3, 64])),
        logit_bias=bias,
        ignore_eos=data.draw(st.booleans()),
        seed=5,
    )
    prompt = data.draw(st.lists(token, max_size=8))
    same_picks(llama, params, rows, prompt)


def test_only_chains_it_reproduces_take_the_shortcuts(llama: Llama) -> None:
    model, ctx, _ = llama

    def built(params: SamplingParams) -> SamplerChain:
        chain = SamplerChain(model, params, 1, ctx.n_ctx)
        chain.free()
        return chain

    plain = [
        SamplingParams(temperature=0.7, frequency_penalty=0.2),  # fused multiply-add in C++
        SamplingParams(temperature=0, mirostat=2),
        SamplingParams(temperature=0, grammar='root ::= "yes" | "no"'),
        # A truncation before the penalties changes what they apply to.
        SamplingParams(temperature=0.7, repeat_penalty=1.1, order=["top_k", "penalties"]),
    ]
    for params in plain:
        assert built(params).edits is None, params
    # The order does not matter when no penalty applies; DRY keeps greedy in the chain.
    assert built(SamplingParams(temperature=0, order=["top_k", "penalties"])).argmax
    assert not built(SamplingParams(temperature=0, dry_multiplier=0.8)).argmax
    assert not built(SamplingParams(temperature=0.7)).argmax
    assert built(SamplingParams(temperature=0.7)).edits is None  # top-k first: all in C
    # Only a chain whose first sampler is min-p hands the chain min-p's candidates alone.
    universal = SamplingParams(temperature=1.25, top_k=0, top_p=1, min_p=0.1)
    assert built(universal)._log_min_p < 0
    assert built(SamplingParams(temperature=1.25, top_k=40, min_p=0.1))._log_min_p == 0
    assert built(SamplingParams(temperature=0, top_k=0, top_p=1, min_p=0.1))._log_min_p == 0
    dry = SamplingParams(temperature=1.25, top_k=0, top_p=1, min_p=0.1, dry_multiplier=0.8)
    assert built(dry)._log_min_p == 0
    temp_first = SamplingParams(
        temperature=1.25, top_k=0, top_p=1, min_p=0.1, order=["temperature"]
    )
    assert built(temp_first)._log_min_p == 0


def test_what_pays_for_which_vocabulary(llama: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """With SmolLM2's 49k tokens, numpy's arg-max and min-p pass cost more than they save
    unless a penalty already touches the row; a bias alone stays in the chain."""
    monkeypatch.setattr(sampling, "LARGE_VOCAB", 100_000)
    model, ctx, _ = llama

    def built(params: SamplingParams) -> SamplerChain:
        chain = SamplerChain(model, params, 1, ctx.n_ctx)
        chain.free()
        return chain

    assert built(SamplingParams(temperature=0, ignore_eos=True)).edits is None
    universal = dict(temperature=1.25, top_k=0, top_p=1.0, min_p=0.1)
    assert built(SamplingParams(**universal)).edits is None
    penalised = built(SamplingParams(**universal, repeat_penalty=1.1))
    assert penalised.edits is not None and penalised._log_min_p < 0
    assert built(SamplingParams(temperature=0, repeat_penalty=1.1)).argmax
    monkeypatch.setattr(sampling, "LARGE_VOCAB", model.n_vocab)  # as many tokens: large
    assert built(SamplingParams(temperature=0)).argmax

"""The llama.cpp wrapper: tokenising, batches, and exact KV-cache position shifts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from innkeeper.engine.backend import Batch, Context, ContextParams, Model
from innkeeper.models.store import default_model_path


@pytest.fixture(scope="module")
def model() -> Model:
    m = Model(default_model_path())
    yield m
    m.close()


def test_tokenize_round_trip(model: Model) -> None:
    text = "Héllo wörld — 日本語 🙂 <|im_start|>"
    ids = model.tokenize(text, add_special=False)
    assert model.detokenize(ids, special=True) == text
    assert model.n_vocab == 49152
    assert model.eog_tokens  # <|im_end|> and friends


def _next_logits(ctx: Context, batch: Batch, token: int, pos: int, seq: int) -> np.ndarray:
    batch.clear()
    batch.add(token, pos, seq, True)
    assert ctx.decode(batch) == 0
    return np.ctypeslib.as_array(ctx.logits(0)).copy()


def test_shifted_cache_predicts_like_a_cold_evaluation(model: Model) -> None:
    """A chunk evaluated at positions 300.. and moved to 0.. by seq_add predicts like the same
    chunk evaluated at 0.. directly, within the noise that evaluating at another position
    causes anyway (quantized kernels round differently at different RoPE angles)."""
    ctx = Context(model, ContextParams(n_ctx=1024, n_seq=3, threads=2))
    batch = Batch(512)
    try:
        tokens = model.tokenize(
            "The old lighthouse keeper climbed the stairs every night to", add_special=False
        )
        n = len(tokens)
        batch.clear()
        batch.add_span(tokens, 0, 0, False)  # cold, at its own positions
        batch.add_span(tokens, 300, 1, False)  # to be moved left by 300
        batch.add_span(tokens, 1, 2, False)  # the same, one position later (noise floor)
        assert ctx.decode(batch) == 0
        nxt = model.tokenize(" light", add_special=False)[0]
        cold = _next_logits(ctx, batch, nxt, n, 0)
        noise = float(np.max(np.abs(cold - _next_logits(ctx, batch, nxt, n + 1, 2))))
        ctx.seq_add(1, 300, 300 + n, -300)
        shifted = _next_logits(ctx, batch, nxt, n, 1)
        diff = float(np.max(np.abs(cold - shifted)))
        assert int(np.argmax(cold)) == int(np.argmax(shifted))
        assert diff <= 2 * noise + 0.05, f"shift error {diff:.3f}, position noise {noise:.3f}"
        assert math.isfinite(diff)
    finally:
        batch.free()
        ctx.close()

"""The linear-time tokeniser gives llama.cpp's own ids (issue 10, defect 2).

Differential: random texts mixing the vocabulary's special tokens, words, whitespace runs
and non-ASCII text are tokenised both ways and must agree exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from innkeeper.engine.backend import Model
from innkeeper.engine.tokenizer import TokenizeCancelled, Tokenizer, TooManyTokens
from innkeeper.models.store import default_model_path


@pytest.fixture(scope="module")
def tok() -> Iterator[Tokenizer]:
    model = Model(default_model_path())
    yield Tokenizer(model)
    model.close()


def reference(tok: Tokenizer, text: str, add_special: bool) -> list[int]:
    return tok.model_tokenize(text.encode("utf-8"), add_special=add_special, parse_special=True)


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
FRAGMENTS = st.one_of(
    st.sampled_from(SPECIALS),
    st.sampled_from(["<|im_start", "im_end|>", "<|", "|>", "<", ">", "user", "assistant"]),
    st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", "   \n"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
    st.from_regex(r"[A-Za-z0-9 .,!?']{1,20}", fullmatch=True),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(FRAGMENTS, max_size=30), add_special=st.booleans())
def test_same_ids_as_llama_cpp(tok: Tokenizer, parts: list[str], add_special: bool) -> None:
    text = "".join(parts)
    assert tok.tokenize(text, add_special=add_special) == reference(tok, text, add_special)


def test_chat_prompts_match(tok: Tokenizer) -> None:
    text = "".join(
        f"<|im_start|>{role}\n{msg}<|im_end|>\n"
        for role, msg in [("system", "Be brief."), ("user", "Hi!"), ("assistant", " Hello.")] * 50
    )
    assert tok.tokenize(text) == reference(tok, text, True)


def test_special_token_flood_is_linear(tok: Tokenizer) -> None:
    """40k chat turns (80k special tokens): llama.cpp's own partition took 16.6 s."""
    flood = "<|im_start|>user\nx<|im_end|>\n" * 40_000
    t0 = time.monotonic()
    ids = tok.tokenize(flood)
    assert time.monotonic() - t0 < 2.0
    small = "<|im_start|>user\nx<|im_end|>\n" * 500
    assert ids == tok.tokenize(small) * 80 and tok.tokenize(small) == reference(tok, small, True)


def test_limit_stops_early_and_soundly(tok: Tokenizer) -> None:
    text = "word " * 100_000
    t0 = time.monotonic()
    with pytest.raises(TooManyTokens) as exc:
        tok.tokenize(text * 60, limit=2047)  # 30 MB: refused from its length alone
    assert time.monotonic() - t0 < 0.5
    assert exc.value.at_least > 2047
    assert len(tok.tokenize("word " * 400, limit=2047)) <= 2047  # under the limit: no error
    with pytest.raises(TooManyTokens):
        tok.tokenize("<|im_start|>x" * 5000, limit=2047)


def test_cancel_stops_between_pieces(tok: Tokenizer) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(TokenizeCancelled):
        tok.tokenize("<|im_start|>user\nx<|im_end|>\n" * 10_000, cancel=cancel)

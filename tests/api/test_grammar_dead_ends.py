"""A grammar whose only way on is a banned token must never kill the server.

llama.cpp's grammar throws a C++ exception (the process aborts) when it is asked to accept a
token it rejects, which is what it gets when every candidate it allows is banned: ignore_eos
at the grammar's end, min_tokens, a banned token, a -100 logit bias. Found by the schema
fuzzer; each case once killed the server (SIGABRT).
"""

from __future__ import annotations

import httpx
import pytest

GRAMMAR = 'root ::= "a"'


@pytest.mark.parametrize(
    "extra",
    [
        {"ignore_eos": True},
        {"min_tokens": 4},
        {"logit_bias": {"64": -100}},
        {"custom_token_bans": "64"},
        {"banned_strings": ["a"]},
        {"ignore_eos": True, "temperature": 0},
        {"ignore_eos": True, "top_n_sigma": 1.0},
    ],
)
def test_a_grammar_dead_end_answers_and_the_server_lives(
    client: httpx.Client, extra: dict[str, object]
) -> None:
    body = {"prompt": "Say a:", "max_tokens": 6, "grammar": GRAMMAR, **extra}
    r = client.post("/v1/completions", json=body)
    assert r.status_code < 500, r.text
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
